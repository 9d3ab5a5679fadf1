"""Give freed heap memory back to the operating system once the service is idle.

glibc keeps memory that decoded images and request bodies used in its heaps (one arena per
decode thread, capped by MALLOC_ARENA_MAX), so after a burst the process stays at its peak
size. `malloc_trim(0)` returns the free parts of every arena. The inference thread calls it
after a quiet second, never while requests are waiting: it costs milliseconds, not throughput.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)


def _libc_trim() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:  # not glibc (macOS, musl without the symbol): nothing to do
        return None


_TRIM = _libc_trim()


def release_free_memory() -> bool:
    """Return free heap memory to the OS; True when glibc gave some back."""
    if _TRIM is None:
        return False
    return bool(_TRIM(0))
