"""Giving memory back to the operating system after a call that freed a lot of it.

Why: glibc keeps freed heap memory for reuse. A 128K-token compression allocates about 1.2 GB
of activations and frees them, yet the process stayed ~800 MB larger afterwards; a server's
resident size then follows its largest call ever, not its work. `malloc_trim` returns the
free pages (about 15 ms after a 128K-token compression, measured in bench/upload_limits.py).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None where the C library has none (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def give_back() -> None:
    """Return the heap's free pages to the operating system (a no-op without glibc)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
