"""Which malloc a process's memory map names (the CPU estimate's heap term depends on it)."""

from __future__ import annotations

from sdtune.util.allocator import malloc_mapped

LIBC = "7f1c2a000000-7f1c2a028000 r--p 00000000 08:01 1234 /usr/lib/x86_64-linux-gnu/libc.so.6\n"
JEMALLOC = "7f1c2b000000-7f1c2b010000 r-xp 00000000 08:01 5678 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n"
ANONYMOUS = "7ffd1c000000-7ffd1c021000 rw-p 00000000 00:00 0 [stack]\n"


def test_a_preloaded_malloc_wins_over_the_c_library():
    assert malloc_mapped(LIBC + JEMALLOC + ANONYMOUS) == "jemalloc"
    assert malloc_mapped(LIBC.replace("libc.so.6", "libtcmalloc_minimal.so.4") + LIBC) == "tcmalloc"


def test_the_c_library_alone_is_glibc_and_no_library_is_the_system_one():
    assert malloc_mapped(LIBC + ANONYMOUS) == "glibc"
    assert malloc_mapped(LIBC.replace("libc.so.6", "libc-2.31.so")) == "glibc"
    assert malloc_mapped(ANONYMOUS) == "system"

