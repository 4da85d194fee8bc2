"""almak.kernels"""
