"""almak.sparse"""
