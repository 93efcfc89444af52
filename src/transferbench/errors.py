"""The project's error types: each message names the file, row or key at fault."""


class TransferbenchError(Exception):
    """A user-facing failure; the CLI prints its message and exits non-zero."""


class DataError(TransferbenchError):
    """Bad or missing input data (names the file or row at fault)."""
