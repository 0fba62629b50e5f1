"""The project's own exceptions: a problem with the user's input or environment.

The command line prints an error of these types as one `error: ...` line (exit code 2)
instead of a traceback; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class KfpGrpoError(Exception):
    """A problem with the user's input or environment; the message says what and where, in one line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class DatasetError(KfpGrpoError, ValueError):
    """Prompt data is missing or malformed; the message names the file and row."""
