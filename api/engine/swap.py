"""What a model swap checks before and after loading the new model beside the served one.

The engine process (api/engine/host.py) runs the swap itself: load in a thread while the served
model keeps answering, check, switch every front-end, retire the old model once it has drained.
These are its rules, kept apart so they read (and are tested) as rules:

- which file: the one asked for (relative paths from the configured checkpoint's folder), else
  the configured path read again;
- room: both models must fit at once, in host memory (MemAvailable and the cgroup's limit; on a CPU
  also the process that converts the new model first) and, on a GPU, in its free memory; refused
  before loading, with the numbers;
- compatible: the same labels in the same order (clients hold indices; the v2 output shape
  [N, C] stays), and an input no larger than the ring slots the front-ends already have.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from api.engine.pipeline import Served

MIB = 1024 * 1024
# A model in memory next to its checkpoint: the state dict read, the module built from it and a
# runtime's converted copy (OpenVINO) each hold the weights for a while.
HOST_COPIES = 3
DEVICE_COPIES = 2
HEADROOM_BYTES = 256 * MIB  # activations, warm-up batches, allocator slack
PREPARE_BYTES = 768 * MIB  # the process that converts the new model first (torch, OpenVINO, one model)
CGROUP = Path("/sys/fs/cgroup")


def resolve_checkpoint(requested: str | None, configured: Path | None) -> Path | None:
    """The file to load: the one asked for, relative to the configured checkpoint's folder (the
    models volume), or the configured one again."""
    if not requested:
        return configured
    path = Path(requested).expanduser()
    if not path.is_absolute():
        base = configured.parent if configured is not None and configured.is_file() else configured
        path = (base or Path.cwd()) / path
    return path


def checkpoint_bytes(path: Path) -> int:
    """The weights' size on disk (a timm folder: every file in it)."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size if path.exists() else 0


@dataclass(frozen=True)
class Room:
    """Whether a second model fits: what it needs and what is free, in bytes."""

    where: str
    needed: int
    free: int

    @property
    def fits(self) -> bool:
        return self.needed <= self.free

    def refusal(self) -> str:
        return (
            f"not enough {self.where} memory to load the new model beside the served one: it needs about "
            f"{self.needed / MIB:.0f} MiB and {self.free / MIB:.0f} MiB is free; free memory (or raise the "
            f"container's limit) and load again, or restart with the new checkpoint"
        )


def host_room(weights: int, *, extra: int = 0, meminfo: Path = Path("/proc/meminfo"), cgroup: Path = CGROUP) -> Room:
    return Room("host", weights * HOST_COPIES + HEADROOM_BYTES + extra, host_free_bytes(meminfo, cgroup))


def device_room(weights: int, free: int) -> Room:
    return Room("GPU", weights * DEVICE_COPIES + HEADROOM_BYTES, free)


def host_free_bytes(meminfo: Path, cgroup: Path) -> int:
    """MemAvailable, or less when the process's cgroup (a container's limit) has less room left."""
    free = 0
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            free = int(line.split()[1]) * 1024
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        used = int((cgroup / "memory.current").read_text())
    except (OSError, ValueError):
        return free
    if limit.isdigit():
        free = min(free, max(int(limit) - used, 0))
    return free


def incompatibility(served: Served, new: Served, *, input_bytes: int, slot_bytes: int) -> str | None:
    """Why `new` cannot take over from `served` in the running service (None: it can)."""
    if new.class_names != served.class_names:
        if len(new.class_names) != len(served.class_names):
            difference = f"{len(new.class_names)} classes instead of {len(served.class_names)}"
        else:
            at = next(i for i, (a, b) in enumerate(zip(served.class_names, new.class_names, strict=True)) if a != b)
            difference = f"label {at} is {new.class_names[at]!r} instead of {served.class_names[at]!r}"
        return (
            f"the new checkpoint's labels differ from the served model's ({difference}); clients rely on the "
            f"label set, so a new one needs a restart with the new checkpoint (API_CHECKPOINT_PATH)"
        )
    if new.multi_label != served.multi_label:
        return "the new model's head (API_MULTI_LABEL) differs from the served model's; restart to change it"
    if input_bytes > slot_bytes:
        return (
            f"the new model's input ({input_bytes} bytes per image) is larger than the running service's "
            f"({slot_bytes}); restart with the new checkpoint"
        )
    return None
