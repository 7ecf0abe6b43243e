"""Giving freed memory back to the operating system after large requests.

glibc keeps the heap pages that many small buffers of a large message occupied (gRPC
receives a message in pieces, from several threads' arenas) after they are freed, so a
burst of large requests would leave the server's RSS near its peak for good. Once no
request is held, `trim` asks glibc to return them (`malloc_trim`); elsewhere it does
nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

TRIM_AFTER_BYTES = 16 << 20  # requests this large in all, once finished, trigger a trim


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_TRIM = _malloc_trim()


def trim() -> None:
    """Return free heap pages to the operating system, where the C library can."""
    if _TRIM is not None:
        _TRIM(0)
