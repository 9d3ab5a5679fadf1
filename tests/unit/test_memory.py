"""The heap policy: freed blocks are kept while busy and go back to the OS on request (the idle trim)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from api.engine.memory import release_free_memory
from tests.support import rss_mb as _rss_mb


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


# The heap policy is process-wide and glibc's thresholds depend on what the process did before, so
# each case runs in a fresh interpreter: allocate and free one 20 MB block, then trim.
_PROBE = """
import json, sys
from pathlib import Path
from api.engine.memory import keep_freed_memory, release_free_memory

def rss_mb():
    status = Path("/proc/self/status").read_text()
    return next(int(l.split()[1]) for l in status.splitlines() if l.startswith("VmRSS:")) / 1024

policy = keep_freed_memory(int(sys.argv[1]))
start = rss_mb()
block = bytearray(20 * 1024 * 1024)  # zero-filled: every page touched
del block
freed = rss_mb()
release_free_memory()
print(json.dumps({"policy": policy, "kept_mb": freed - start, "after_trim_mb": rss_mb() - start}))
"""


def _probe(keep_mb: int, **env: str) -> dict:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, str(keep_mb)],
        env={**environment, **env},
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    return json.loads(result.stdout)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_the_policy_keeps_freed_blocks_until_the_idle_trim() -> None:
    kept = _probe(128)
    assert kept["policy"] == "heap policy: keep up to 128 MB freed while busy, trimmed after a quiet second"
    assert kept["kept_mb"] > 15, kept  # the next forward pass reuses these pages instead of faulting them in
    assert kept["after_trim_mb"] < 5, kept  # and the idle trim hands them back


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_glibc_defaults_hand_a_large_block_back_at_once() -> None:
    default = _probe(0)
    assert default["policy"] == "heap policy: glibc defaults (API_HEAP_KEEP_MB=0)"
    assert default["kept_mb"] < 5, default  # mmapped and unmapped: what made every pass fault its pages in


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_the_operators_glibc_variables_win() -> None:
    chosen = _probe(128, MALLOC_TRIM_THRESHOLD_="0")
    assert chosen["policy"] == "heap policy: the operator's MALLOC_TRIM_THRESHOLD_"
    assert chosen["kept_mb"] < 5, chosen
