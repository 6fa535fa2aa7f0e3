"""The one exception type users see as a one-line message instead of a traceback."""


class NFNetZooError(Exception):
    """A problem with the user's input or environment; the message names the problem and the fix."""
