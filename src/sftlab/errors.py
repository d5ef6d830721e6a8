"""The error type every layer raises for bad input."""


class SftlabError(Exception):
    """A user-facing error: its message is one line that says what is wrong and what to do.

    The CLI prints it without a traceback (unless --debug) and exits with ``exit_code``.
    """

    exit_code = 2
