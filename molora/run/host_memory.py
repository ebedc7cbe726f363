"""Give freed host (CPU) memory back to the operating system.

PyTorch's CPU allocator is the C library's ``malloc``. glibc serves large blocks from ``mmap`` at first, but
raises its mmap threshold each time such a block is freed (up to 32 MB), after which tensors come from the
main heap; freed blocks in the middle of that heap are kept by the process. Training with sequence lengths
that change from step to step (``group_by_length``, answer-only batches, evaluation) then grows the resident
size without bound: a SmolLM2-135M run on RTE reached 17.5 GB RSS with 4 GB in use, and ``malloc_trim(0)``
brought it back to 4.0 GB. :func:`release_free_memory` calls it (a few ms on a fragmented heap, microseconds
otherwise); ``molora train`` does so after every optimizer step and every evaluation batch.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from functools import lru_cache
from typing import Optional

__all__ = ["release_free_memory", "resident_bytes", "peak_resident_bytes"]


@lru_cache(maxsize=1)
def _malloc_trim() -> Optional[ctypes._CFuncPtr]:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim  # glibc only (musl has no malloc_trim)
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_free_memory() -> bool:
    """Return the C heap's free pages to the OS (glibc ``malloc_trim(0)``). False where unavailable."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def resident_bytes() -> Optional[int]:
    """Resident set size of this process in bytes (Linux ``/proc/self/statm``), or None elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


def peak_resident_bytes() -> Optional[int]:
    """The highest resident set size this process has had, in bytes (``getrusage`` ``ru_maxrss``; Linux reports
    KiB, macOS bytes), or None where unavailable. Unlike :func:`resident_bytes` it cannot miss a short peak."""
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (ImportError, OSError, ValueError):
        return None
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024
