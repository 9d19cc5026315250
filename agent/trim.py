"""Give freed heap memory back to the operating system after a deployment.

A deployment passes megabytes of chunk frames through the daemon (paho's thread receives them,
the dispatcher forwards them) and loads a new model. glibc keeps freed memory in its arenas for
reuse, where it still counts as the daemon's resident memory; ``malloc_trim(0)`` returns the
free pages. On a C library without it (musl), this does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util

__all__ = ["release_free_memory"]


def release_free_memory() -> None:
    with contextlib.suppress(OSError, AttributeError, TypeError):
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
