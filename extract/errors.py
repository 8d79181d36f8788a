"""The one error type users see: a message that names the thing to fix.

The command line prints these as a single line and exits with status 2; any
other exception is a bug and keeps its traceback.
"""


class CkapipeError(ValueError):
    """Bad input or an unusable cache; ``str(err)`` is the one-line message."""
