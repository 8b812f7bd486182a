"""The one error family a user sees: each message says what went wrong, where, and what to do."""

# Exit codes, the same for every command (documented in `edgeport --help`).
MET, MISSED, NOT_CHECKED, ERROR = 0, 1, 2, 3


class EdgeportError(Exception):
    """An error the CLI prints as one line, without a traceback (unless --debug), and exits with `exit_code`:
    ERROR for bad input and failures, MISSED where the answer itself is no (an artifact failed parity)."""

    def __init__(self, message: str, exit_code: int = ERROR):
        super().__init__(message)
        self.exit_code = exit_code
