"""The mark of an error that is the user's to fix: the CLI prints it as one line, no traceback.

Everything else that escapes is a bug of ours and keeps its traceback. A leaf module: every module
that defines a user error imports it, it imports nothing of sdtune.
"""

from __future__ import annotations


class UserError(Exception):
    """Base of the errors whose message names the bad input and the fix (ConfigError, DataError, …)."""


def first_line(error: BaseException, limit: int = 200) -> str:
    """An exception's first message line (or its type's name), for a one-line error."""
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:limit]


def one_line(error: BaseException, limit: int = 200) -> str:
    """An exception as one short line: its type and the start of its message (whitespace folded)."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:limit]}{'…' if len(text) > limit else ''}"
