"""almak.cli"""
