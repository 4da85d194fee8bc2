"""almak's version, written into every checkpoint recipe and report (``almak.__version__`` is this)."""

__version__ = "0.1.0"
