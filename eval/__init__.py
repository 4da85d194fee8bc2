"""almak.eval"""
