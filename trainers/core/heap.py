"""Handing freed memory back to the operating system.

glibc keeps freed blocks below its mmap threshold (which grows to 32 MB after large frees) in its heap, so after
a load that reads thousands of tensors, or a VAE pass, the process holds gigabytes it no longer uses, and the
ComfyUI server beside it keeps them for the rest of the run. malloc_trim returns them.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

_libc = None


def trim() -> None:
    """Return the heap's free memory to the OS (glibc only; elsewhere nothing to do)."""
    global _libc
    if not sys.platform.startswith("linux"):
        return
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _libc.malloc_trim(0)
    except (OSError, AttributeError):  # musl and others have no malloc_trim
        pass
