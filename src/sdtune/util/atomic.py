"""Every file sdtune writes goes through here: to a temporary file beside its target, renamed into
place when complete, so that a reader (a browser, another process, a resumed run) never sees half a
file and a failed write leaves the previous file as it was.

:func:`replacing` is the one mechanism (a file or a folder); the ``write_*``/``save_*`` helpers are
its common uses, and :func:`filling` hands a writer that names several files itself (a technique's
outputs, a diffusers ``save_pretrained``) a private folder whose entries are moved into the target
folder only when all of them are written. A folder that already exists is moved aside, the new one
renamed into place, and only then is the old one removed: the last good state is never deleted
before its replacement exists.

A write that fails for a reason of the environment (a full disk, a file-size limit, a quota, no
permission, a read-only file system) ends in :class:`WriteError`: one line naming the path, the
cause and the fix. Any other error is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sdtune.errors import UserError

# errno → what to do about it: the environment's causes of a failed write (os.strerror names them)
ENVIRONMENT_ERRNOS: dict[int, str] = {
    errno.ENOSPC: "free some space, or write to another disk",
    errno.EFBIG: "the file is larger than this process may write (ulimit -f, or the file system's limit)",
    errno.EDQUOT: "the disk quota is used up: free some space, or ask for a larger quota",
    errno.EACCES: "make the folder writable, or write to another folder",
    errno.EPERM: "make the folder writable, or write to another folder",
    errno.EROFS: "the file system is read-only: write to another folder",
}
_RUST_OS_ERROR = re.compile(r"os error (\d+)")  # safetensors (Rust) reports I/O errors as text


class WriteError(UserError, OSError):
    """A file could not be written for a reason of the environment (see :data:`ENVIRONMENT_ERRNOS`);
    nothing was replaced. ``path`` is the file or folder being written; ``then``: what to do next
    (a caller that knows, e.g. how to finish a run, adds it)."""

    def __init__(self, path: Path, code: int, then: str = "") -> None:
        self.path, self.code = Path(path), code
        message = f"cannot write {path}: {os.strerror(code)} ({ENVIRONMENT_ERRNOS[code]})" + (f"; {then}" if then else "")
        super().__init__(code, message)

    def __str__(self) -> str:
        return self.args[1]


def environment_errno(error: BaseException) -> int | None:
    """The errno of a failed write when its cause is the environment's, else None (a bug of ours).
    Looks through the chain of causes (libraries wrap OSErrors) and safetensors' Rust errors."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, WriteError):
            return error.code
        if isinstance(error, OSError) and error.errno in ENVIRONMENT_ERRNOS:
            return error.errno
        if type(error).__name__ == "SafetensorError":
            found = _RUST_OS_ERROR.search(str(error))
            if found and int(found.group(1)) in ENVIRONMENT_ERRNOS:
                return int(found.group(1))
        error = error.__cause__ or error.__context__
    return None


def temporary_name(path: Path, kind: str = "tmp") -> Path:
    """A hidden name beside ``path``, unique to this process and call."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.{kind}")


@contextlib.contextmanager
def reported(path: str | Path) -> Iterator[None]:
    """Turn an environment's write failure inside the block into a :class:`WriteError` naming ``path``."""
    try:
        yield
    except WriteError:
        raise
    except Exception as error:
        code = environment_errno(error)
        if code is None:
            raise
        raise WriteError(Path(path), code) from error


@contextlib.contextmanager
def replacing(path: str | Path, folder: bool = False, first_wins: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to (``folder``: an empty folder); when the block
    ends without an error it replaces ``path``, else it is removed and ``path`` is left untouched.
    ``first_wins``: a ``path`` that exists by then (another process wrote the same content) is kept
    and what was written here is dropped."""
    path = Path(path)
    with reported(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = temporary_name(path)
        if folder:
            temporary.mkdir()
        try:
            yield temporary
            if first_wins:
                _move_unless_there(temporary, path)
            else:
                _move_into_place(temporary, path)
        except BaseException:
            _remove(temporary)
            raise


def _move_unless_there(temporary: Path, path: Path) -> None:
    if path.exists():
        _remove(temporary)
        return
    try:
        os.replace(temporary, path)  # (a folder cannot replace a non-empty one: the other writer won)
    except OSError:
        if not path.exists():
            raise
        _remove(temporary)


@contextlib.contextmanager
def filling(folder: str | Path) -> Iterator[Path]:
    """Yield an empty private folder with ``folder``'s name (writers that embed the folder's name see
    the right one); when the block ends without an error each entry written there replaces the entry
    of the same name in ``folder`` (created if missing), else everything written is removed and
    ``folder`` is left untouched. Entries of ``folder`` that the block does not write are kept."""
    folder = Path(folder)
    with reported(folder):
        folder.parent.mkdir(parents=True, exist_ok=True)
        holder = temporary_name(folder)
        staging = holder / folder.name
        staging.mkdir(parents=True)
        try:
            yield staging
            folder.mkdir(exist_ok=True)
            for entry in sorted(staging.iterdir()):
                _move_into_place(entry, folder / entry.name)
        finally:
            _remove(holder)


def _move_into_place(temporary: Path, path: Path) -> None:
    if not temporary.is_dir() or not path.exists():
        os.replace(temporary, path)
        return
    aside = temporary_name(path, "old")
    os.replace(path, aside)  # the old folder stays complete until the new one is in place
    os.replace(temporary, path)
    _remove(aside)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def remove(path: str | Path) -> None:
    """Remove a file or folder (gone already: nothing to do)."""
    _remove(Path(path))


def write_with(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(temporary_path)`` and rename the result into place."""
    with replacing(path) as temporary:
        write(temporary)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    return write_with(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def write_bytes(path: str | Path, data: bytes) -> Path:
    return write_with(path, lambda temporary: temporary.write_bytes(data))


def write_json(path: str | Path, data: Any, default: Callable[[Any], Any] | None = None, **options: Any) -> Path:
    """JSON with a trailing newline (``indent=2`` unless given)."""
    options.setdefault("indent", 2)
    return write_text(path, json.dumps(data, default=default, **options) + "\n")


def save_tensors(path: str | Path, tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> Path:
    """A safetensors file (the tensors made contiguous, on the CPU)."""
    from safetensors.torch import save_file

    tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}
    return write_with(path, lambda temporary: save_file(tensors, str(temporary), metadata=metadata))


def save_image(path: str | Path, image: Any, format: str = "PNG") -> Path:
    """A PIL image (the format given explicitly: the temporary name has no image suffix)."""
    return write_with(path, lambda temporary: image.save(temporary, format=format))


def save_figure(path: str | Path, figure: Any, **options: Any) -> Path:
    """A matplotlib figure as PNG (``options``: ``savefig``'s, e.g. ``dpi``)."""
    return write_with(path, lambda temporary: figure.savefig(temporary, format="png", **options))
