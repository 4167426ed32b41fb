"""Keep freed heap memory in the process instead of handing it back to the kernel (glibc only).

glibc serves big allocations (above a threshold that adapts up to 32 MiB) with a fresh ``mmap`` and
unmaps them on free, so a forward pass whose activations are hundreds of MB each (Swin-L at 1024²:
200 MB per stage-1 MLP output) takes a page fault for every 4 KiB it writes, every time. With mmap
disabled and heap trimming off, freed blocks stay mapped and the next forward reuses them. Measured
on the 2-core EPYC VM (bench/bench_model.py, fused, 1024²): Swin-L 19.4 s -> 13.8 s, Swin-T 5.4 s -> 4.5 s;
a 4096x768x3072 GEMM 174 -> 210 GFLOP/s. The cost: the process keeps its high-water mark of heap
memory (Swin-L 1024² peak RSS 3.65 -> 3.91 GiB) instead of shrinking between jobs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

# mallopt(3) parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4

_applied = False


def retain_freed_memory() -> bool:
    """Tell glibc's malloc to never trim the heap and never use mmap; True if it took effect.

    Idempotent and process-wide. Returns False (and changes nothing) on a C library without
    ``mallopt`` (musl, macOS)."""
    global _applied
    if _applied:
        return True
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        log.info("allocator: %s has no mallopt; freed memory goes back to the OS", name)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success. -1 as the trim threshold disables trimming (mallopt(3)).
    ok = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, -1) == 1
    if ok:
        _applied = True
        log.info("allocator: glibc keeps freed memory (no mmap for large blocks, no heap trim)")
    else:
        log.warning("allocator: mallopt refused; freed memory goes back to the OS")
    return ok
