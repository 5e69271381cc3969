"""The process's own memory: its resident set size, and glibc's heap (how many arenas, giving
free pages back). Plain ctypes and /proc; every function is a harmless no-op or None where the
platform has no such thing (not Linux, not glibc)."""
from __future__ import annotations

import gc
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


def freeze_startup_heap() -> int:
    """Take what the process holds at the end of its start-up out of Python's full garbage
    collections; returns how many objects that was. A full (generation 2) collection walks
    every object the collector tracks, with the GIL held: after the imports (torch, numpy,
    scipy, pydantic, grpc) a server holds ~350k of them, and each full collection took 40-85
    ms, during which every request in flight waited (seen in a burst of first requests after a
    restart). The modules, the model and the monitor's long-lived structures live as long as
    the process: one collection first (start-up garbage goes), then ``gc.freeze`` moves the
    survivors to the permanent generation, which later collections skip (a full one then took
    0.01 ms in process). Objects created afterwards are collected as before."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
