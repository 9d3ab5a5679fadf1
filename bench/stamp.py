"""Where a figure came from: the CPU (model, the flags that decide bf16/INT8 speed, cores this
process may use), the library versions, the commit and the date. Every bench prints it first and
stores it with its results, so a table in docs/ can say what it was measured on.

    .venv/bin/python -m bench.stamp
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import platform
import subprocess
from pathlib import Path

from api.cpu import cpu_budget

FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")
ROOT = Path(__file__).resolve().parents[1]


def _cpuinfo() -> tuple[str, list[str]]:
    model, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    return model, [flag for flag in FLAGS if flag in flags]


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"], capture_output=True, text=True, cwd=ROOT, timeout=10
        )
    except OSError:
        return "unknown"
    return out.stdout.strip() or "unknown"


def stamp() -> dict[str, object]:
    model, flags = _cpuinfo()
    return {
        "cpu": model,
        "flags": flags,
        "cpus": cpu_budget().cpus,
        "python": platform.python_version(),
        "torch": _version("torch"),
        "openvino": _version("openvino"),
        "commit": _commit(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d"),
    }


def line(values: dict[str, object] | None = None) -> str:
    """The stamp as one line, as docs/performance.md quotes it."""
    s = values or stamp()
    flags = ", ".join(str(flag) for flag in s["flags"]) or "no AVX2"  # type: ignore[attr-defined]
    return (
        f"{s['date']}, {s['cpu']} ({s['cpus']} CPUs; {flags}), "
        f"Python {s['python']}, torch {s['torch']}, OpenVINO {s['openvino']}, commit {s['commit']}"
    )


if __name__ == "__main__":
    values = stamp()
    print(line(values))
    print(json.dumps(values))
