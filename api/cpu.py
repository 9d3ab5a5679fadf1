"""How many CPUs this process may really use: the cgroup quota, not the host's core count.

Under Compose `cpus: 4` on a 64-core host, `os.cpu_count()` and PyTorch both see 64; running 64
threads on a 4-CPU quota thrashes. Read the quota (cgroup v2 `cpu.max`, v1 `cpu.cfs_quota_us` /
`cpu.cfs_period_us`) and the affinity mask, and size threads from the smaller.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu_quota(root: Path = CGROUP_ROOT) -> float | None:
    """CPUs allowed by the cgroup quota, or None when unlimited/unknown."""
    v2 = root / "cpu.max"
    try:
        if v2.is_file():
            quota, _, period = v2.read_text().strip().partition(" ")
            if quota != "max" and int(period or 100000) > 0:
                return int(quota) / int(period or 100000)
            return None
        v1_quota, v1_period = root / "cpu" / "cpu.cfs_quota_us", root / "cpu" / "cpu.cfs_period_us"
        if not v1_quota.is_file():
            v1_quota, v1_period = root / "cpu,cpuacct" / "cpu.cfs_quota_us", root / "cpu,cpuacct" / "cpu.cfs_period_us"
        if v1_quota.is_file() and v1_period.is_file():
            quota_us, period_us = int(v1_quota.read_text()), int(v1_period.read_text())
            if quota_us > 0 and period_us > 0:
                return quota_us / period_us
    except (OSError, ValueError):
        return None
    return None


def affinity_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@dataclass(frozen=True)
class CpuBudget:
    cpus: float  # what this process group may use
    source: str  # where that number came from
    threads: int  # torch intra-op threads (and decode pool size) for one worker

    def describe(self) -> str:
        return f"{self.threads} threads per worker ({self.source})"


def cpu_budget(setting: int | None = None, *, workers: int = 1, root: Path = CGROUP_ROOT) -> CpuBudget:
    """Threads for one worker: API_NUM_THREADS, else the CPU quota shared by the workers."""
    affinity = affinity_cpus()
    quota = cgroup_cpu_quota(root)
    cpus = min(quota, affinity) if quota else float(affinity)
    source = f"cgroup quota {quota:g} CPUs" if quota and quota < affinity else f"{affinity} CPUs visible"
    if setting:
        return CpuBudget(cpus, f"API_NUM_THREADS={setting}; {source}", setting)
    threads = max(1, math.floor(cpus / max(1, workers)))
    if workers > 1:
        source += f" shared by {workers} workers"
    return CpuBudget(cpus, source, threads)
