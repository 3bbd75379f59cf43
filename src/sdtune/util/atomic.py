"""Every file sdtune writes goes through here: to a temporary file beside its target, renamed into
place when complete, so that a reader (a browser, another process, a resumed run) never sees half a
file and a failed write leaves the previous file as it was.

:func:`replacing` is the one mechanism (a file or a folder); the ``write_*``/``save_*`` helpers are
its common uses. A folder that already exists is moved aside, the new one renamed into place, and
only then is the old one removed: the last good state is never deleted before its replacement exists.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def temporary_name(path: Path, kind: str = "tmp") -> Path:
    """A hidden name beside ``path``, unique to this process and call."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.{kind}")


@contextlib.contextmanager
def replacing(path: str | Path, folder: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to (``folder``: an empty folder); when the block
    ends without an error it replaces ``path``, else it is removed and ``path`` is left untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_name(path)
    if folder:
        temporary.mkdir()
    try:
        yield temporary
        _move_into_place(temporary, path)
    except BaseException:
        _remove(temporary)
        raise


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


def write_with(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(temporary_path)`` and rename the result into place."""
    with replacing(path) as temporary:
        write(temporary)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    return write_with(path, lambda temporary: temporary.write_text(text))


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
