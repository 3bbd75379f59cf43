"""The mark of an error that is the user's to fix: the CLI prints it as one line, no traceback.

Everything else that escapes is a bug of ours and keeps its traceback. A leaf module: every module
that defines a user error imports it, it imports nothing.
"""

from __future__ import annotations


class UserError(Exception):
    """Base of the errors whose message names the bad input and the fix (ConfigError, DataError, …)."""
