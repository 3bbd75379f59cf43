"""Keep the CPU memory a training process frees, for its next allocation (glibc's malloc).

torch has no caching allocator for the CPU: every tensor comes from ``malloc``, and glibc serves
large blocks with fresh ``mmap`` pages that it unmaps again on ``free``. A training step allocates
and frees the same gradient and activation buffers over and over, so each one is paid for again in
page faults and in the kernel zeroing the new pages. Full fine-tuning of SD 1.5 at 128 px spent a
third of its step there on this project's CPU machines (3.23 s → 2.12 s per forward + backward of
one image with the settings below; `benchmarks/levers.py`, the README's benchmarks). With ``mmap`` off and a high trim threshold, freed
blocks stay in the heap and are reused, which is what a caching allocator does on a GPU.

Process-wide and idempotent; a no-op where the C library has no ``mallopt`` (macOS, musl). sdtune's
CLI trains each technique in its own process, so the setting is that process's.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from pathlib import Path

_M_TRIM_THRESHOLD = -1  # glibc's malloc.h
_M_MMAP_MAX = -4
_KEEP_BELOW = 2**31 - 1  # return a free block at the heap's top to the system only above 2 GiB

_state = "default"


def keep_freed_memory() -> str:
    """Switch this process's malloc to keeping freed memory; return the allocator's state."""
    global _state
    if _state == "kept":
        return _state
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is not None and mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, _KEEP_BELOW) == 1:
        _state = "kept"
    return _state


def state() -> str:
    """``kept`` once :func:`keep_freed_memory` took effect in this process, else ``default``."""
    return _state


# shared libraries that replace the C library's malloc when loaded (LD_PRELOAD or linked in)
_REPLACEMENTS = {"libjemalloc": "jemalloc", "libtcmalloc": "tcmalloc", "libmimalloc": "mimalloc"}


def malloc_in_use() -> str:
    """Which malloc serves this process: ``jemalloc``, ``tcmalloc`` or ``mimalloc`` where one is
    mapped into it (/proc/self/maps), else ``glibc`` (Linux) or ``system``. A child process started
    with the same environment gets the same one, which is what lets the peak-memory estimate use it
    for the run it estimates (the two differ a lot on the CPU: docs/memory.md)."""
    maps = Path("/proc/self/maps")
    return malloc_mapped(maps.read_text()) if maps.exists() else "system"


def malloc_mapped(maps: str) -> str:
    """The malloc named by a process's memory map (the text of /proc/PID/maps): a replacement
    library where one is mapped, else ``glibc`` where the C library is, else ``system``."""
    names = {line.rsplit("/", 1)[-1] for line in maps.splitlines() if "/" in line}
    for prefix, name in _REPLACEMENTS.items():
        if any(mapped.startswith(prefix) for mapped in names):
            return name
    return "glibc" if any(mapped.startswith(("libc.so", "libc-")) for mapped in names) else "system"
