"""almak.modeling"""
