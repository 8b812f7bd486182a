"""The one error family a user sees: each message says what went wrong, where, and what to do."""


class EdgeportError(Exception):
    """An error the CLI prints as one line, without a traceback (unless --debug)."""
