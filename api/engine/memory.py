"""The heap policy: keep freed memory while busy, give it back to the operating system once idle.

A forward pass allocates and frees its activations (tens of MB per layer at batch 8), and the
batch size changes from pass to pass. glibc's default policy hands large freed blocks back at
once (munmap, heap trimming) and faults fresh zeroed pages in on the next pass: measured on
resnet50, CPU, concurrency 16, that was ~4,000 page faults per image and 5-10 % of the
throughput. `keep_freed_memory` raises glibc's mmap threshold to its maximum (32 MiB) and its trim
threshold to `keep_mb`, so the next pass reuses those blocks; `release_free_memory` (the
inference thread calls it after a quiet second, never while requests wait) then returns the free
parts of every arena, so a burst does not leave the process at its peak. The arena count is
capped by MALLOC_ARENA_MAX (image, `make run`): decode threads would each keep an arena of freed
image buffers.

The decode pool also hands memory back after each costly upload (`release_after_decode`).

Operators' own glibc variables (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_, GLIBC_TUNABLES)
win; `keep_mb=0` leaves glibc's defaults. Not glibc (macOS, musl): nothing to do.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
ARENA_MAX = 2  # as the image and `make run` set MALLOC_ARENA_MAX
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc refuses larger values on 64-bit
OPERATOR_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


_LIBC = _libc()


# Set once `keep_freed_memory` has raised the thresholds: the operator chose to keep freed memory.
_keeping = False
# An upload priced above this (a canvas of about 4 megapixels) hands its freed memory back when done.
RELEASE_AFTER_BYTES = 16 * 1024 * 1024


def keep_freed_memory(keep_mb: int) -> str:
    """Let the heap keep up to `keep_mb` of freed memory between passes; says what was done."""
    global _keeping
    if _LIBC is None:
        return "heap policy: not glibc, allocator defaults"
    chosen = [name for name in OPERATOR_VARIABLES if os.environ.get(name)]
    if chosen:
        return f"heap policy: the operator's {', '.join(chosen)}"
    if keep_mb <= 0:
        return "heap policy: glibc defaults (API_HEAP_KEEP_MB=0)"
    trim = keep_mb * 1024 * 1024
    if not (_LIBC.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) and _LIBC.mallopt(M_TRIM_THRESHOLD, trim)):
        return "heap policy: glibc refused mallopt, allocator defaults"
    _keeping = True
    return f"heap policy: keep up to {keep_mb} MB freed while busy, trimmed after a quiet second"


def cap_arenas(arenas: int = ARENA_MAX) -> str:
    """Cap glibc's malloc arenas for threads started from now on, unless the operator set
    MALLOC_ARENA_MAX (or GLIBC_TUNABLES): what the image and `make run` do by environment, here for
    every entry point (`uvicorn api.main:app` run directly, Gunicorn, tests)."""
    if os.environ.get("MALLOC_ARENA_MAX") or os.environ.get("GLIBC_TUNABLES"):
        return "malloc arenas: as the environment sets them"
    if _LIBC is None or not _LIBC.mallopt(M_ARENA_MAX, arenas):
        return "malloc arenas: not glibc, left as they are"
    return f"malloc arenas: at most {arenas} (decode threads would each keep one of freed image buffers)"


def release_free_memory() -> bool:
    """Return free heap memory to the OS; True when glibc gave some back."""
    if _LIBC is None:
        return False
    return bool(_LIBC.malloc_trim(0))


def release_after_decode(priced_bytes: int) -> bool:
    """After a costly upload (decoded, or failed part-way), return the heap memory it freed.

    glibc raises its mmap threshold as large blocks are freed, so image buffers soon come from the
    heap, and freed ones stay resident until trimmed: over thousands of odd uploads that read as a
    leak of tens of MB. A trim costs a few milliseconds, so only uploads priced above
    RELEASE_AFTER_BYTES pay it, and not when the operator keeps freed memory (API_HEAP_KEEP_MB).
    """
    if _keeping or priced_bytes < RELEASE_AFTER_BYTES:
        return False
    return release_free_memory()
