"""The one exception type almak raises for bad input; the CLI prints its message without a traceback."""


class AlmakError(Exception):
    """A problem with what the user asked for: a missing file, an unknown model, a refused shape."""
