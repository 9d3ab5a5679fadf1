"""Freed heap memory goes back to the OS on request (what the idle inference thread does)."""

from __future__ import annotations

from pathlib import Path

import pytest

from api.memory import release_free_memory


def _rss_mb() -> float:
    status = Path("/proc/self/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")) / 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_free_heap_pages_are_returned() -> None:
    # 100 KB blocks come from the heap (below glibc's mmap threshold); keeping every 20th one
    # pins the heap's top, so glibc cannot shrink it by itself when the rest is freed.
    blocks = [bytearray(100_000) for _ in range(3000)]
    for block in blocks:
        block[::4096] = b"x" * len(block[::4096])  # touch every page
    kept = blocks[::20]
    del blocks
    before = _rss_mb()
    assert release_free_memory() is True
    after = _rss_mb()
    assert before - after > 150, f"RSS {before:.0f} -> {after:.0f} MiB"
    assert len(kept) == 150
