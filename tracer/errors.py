"""The one exception type for bad user input; the CLI prints its message as one line and exits 2."""


class FlopdiffError(Exception):
    """A user error: the message names the input at fault and what to do about it."""
