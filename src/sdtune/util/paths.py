"""Where a command will write, checked before it does any work: a folder it can create or write in,
a file it may (or may not) replace, and whether one path lies inside another.

Every check here is cheap (no model, no data) and ends in one line naming the option and the fix,
so a command refuses a bad output path before it loads anything, rather than after an hour of
training. Writability is tested by creating (and removing) a temporary file where the output will
go: permission bits do not tell the whole story (root, read-only mounts, ACLs, full quotas).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from sdtune.errors import UserError


class OutputPathError(UserError, OSError):
    """An output path that cannot be written as asked: the message names the option and the fix."""


def nearest_existing(path: Path) -> Path:
    """``path`` itself if it exists, else its closest ancestor that does."""
    path = Path(os.path.abspath(Path(path).expanduser()))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable_folder(path: str | Path, key: str) -> Path:
    """``path`` can be (or is) a folder this process can write in; return it. ``key`` names the
    option or experiment key in the message (``--output``, ``output_dir``)."""
    path = Path(path).expanduser()
    existing = nearest_existing(path)
    if not existing.is_dir():
        where = "is a file" if existing == Path(os.path.abspath(path)) else f"lies under the file {str(existing)!r}"
        raise OutputPathError(f"{key}: {str(path)!r} {where}; give a folder (it is created if missing)")
    try:
        handle, probe = tempfile.mkstemp(prefix=".sdtune-write-test-", dir=existing)
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise OutputPathError(
            f"{key}: cannot write in {str(existing)!r} ({reason}); give a folder you can write to"
        ) from None
    os.close(handle)
    os.unlink(probe)
    return path


def check_output_file(path: str | Path, key: str, overwrite: bool) -> Path:
    """``path`` is a file this process may write: not a folder, in a writable folder, and replaced
    only with ``overwrite`` (the replacement is atomic: see :mod:`sdtune.util.atomic`)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise OutputPathError(f"{key}: {str(path)!r} is a folder; give a file name")
    if path.exists() and not overwrite:
        raise OutputPathError(f"{key}: {path} exists; choose another file or pass --overwrite")
    check_writable_folder(path.parent, key)
    return path


def is_within(path: str | Path, folder: str | Path) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it (both resolved: links and ``..`` followed)."""
    path, folder = Path(path).expanduser().resolve(), Path(folder).expanduser().resolve()
    return path == folder or folder in path.parents
