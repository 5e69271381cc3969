"""The process's own memory: its resident set size, and glibc's heap (how many arenas, giving
free pages back). Plain ctypes and /proc; every function is a harmless no-op or None where the
platform has no such thing (not Linux, not glibc)."""
from __future__ import annotations

import os


def _libc():
    try:
        import ctypes
        import ctypes.util
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


_LIBC = _libc()
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int | None:
    """This process's resident set size now (Linux /proc/self/statm), or None where unknown."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def limit_heap_arenas(n: int = 2) -> None:
    """glibc gives threads that allocate concurrently their own heap arenas (up to 8 per
    core); with a pool of gRPC workers the memory of evicted clients is then spread over many
    arenas and stays in RSS. A few arenas (mallopt M_ARENA_MAX) keep it where
    :func:`trim_heap` returns it. Call it before the threads start allocating."""
    if _LIBC is not None and hasattr(_LIBC, "mallopt"):
        _LIBC.mallopt(-8, n)     # M_ARENA_MAX


def trim_heap() -> None:
    """Give the C heap's free pages back to the system (glibc malloc_trim)."""
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)
