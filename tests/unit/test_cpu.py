"""Threads follow the container's CPU quota (cgroup v1 and v2), not the host's core count."""

from __future__ import annotations

from pathlib import Path

import pytest

from api import cpu as resources
from api.cpu import cgroup_cpu_quota, cpu_budget


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"cpu.max": "200000 100000\n"}, 2.0),
        ({"cpu.max": "150000 100000\n"}, 1.5),
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "400000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 4.0),
        ({"cpu,cpuacct/cpu.cfs_quota_us": "50000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, 0.5),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),
    ],
)
def test_quota_from_cgroup_files(tmp_path: Path, files: dict[str, str], expected: float | None) -> None:
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(content)
    assert cgroup_cpu_quota(tmp_path) == expected


def test_threads_follow_the_quota_not_the_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resources, "affinity_cpus", lambda: 64)  # a big host
    (tmp_path / "cpu.max").write_text("400000 100000\n")  # Compose cpus: 4
    budget = cpu_budget(root=tmp_path)
    assert budget.threads == 4 and "quota 4" in budget.source
    assert cpu_budget(workers=2, root=tmp_path).threads == 2  # workers x threads <= quota
    assert cpu_budget(workers=8, root=tmp_path).threads == 1
    assert cpu_budget(3, root=tmp_path).threads == 3  # API_NUM_THREADS wins
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cpu_budget(root=tmp_path).threads == 64
