"""The one exception type that reaches the user as a one-line message."""


class NetbootError(Exception):
    """A problem with the user's input or environment; the CLI prints it on one line and exits 2."""

    exit_status = 2
