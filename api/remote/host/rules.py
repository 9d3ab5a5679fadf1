"""What a model swap checks before and after loading the new model beside the served one.

The swap itself is api/remote/host/swapper.py. These are its rules, kept apart so they read (and are
tested) as rules:

- which file: the one asked for, resolved (symlinks included) inside the models folder (the folder
  of the configured checkpoint, or API_MODEL_REPOSITORY), relative paths from there; else the
  configured one again. Only regular files and folders of them: never a device, a FIFO or a socket,
  and nothing is opened here;
- room: both models must fit at once, in host memory (MemAvailable and the cgroup's limit; also the
  process that builds the new model first) and, on a GPU, in its free memory; the size comes from
  the file system, before a byte is read; refused before loading, with the numbers;
- compatible: the same labels in the same order (clients hold indices; the v2 output shape
  [N, C] stays), and an input no larger than the ring slots the front-ends already have.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from api.engine.model.served import Served
from api.errors import ModelLoadError

MIB = 1024 * 1024
# A model in memory next to its checkpoint: the state dict read, the module built from it and a
# runtime's converted copy (OpenVINO) each hold the weights for a while.
HOST_COPIES = 3
DEVICE_COPIES = 2
HEADROOM_BYTES = 256 * MIB  # activations, warm-up batches, allocator slack
PREPARE_BYTES = 768 * MIB  # the process that converts the new model first (torch, OpenVINO, one model)
CGROUP = Path("/sys/fs/cgroup")


def models_root(configured: Path | None, repository: Path | None) -> Path | None:
    """The folder a swap may load from: API_MODEL_REPOSITORY, else the folder holding the configured
    checkpoint (file or timm model folder); None when neither is set."""
    if repository is not None:
        return Path(os.path.realpath(repository))
    if configured is not None:
        return Path(os.path.realpath(configured)).parent
    return None


def vet_checkpoint(requested: str | None, configured: Path | None, root: Path | None) -> Path:
    """The checkpoint a swap loads, resolved: `requested` inside `root` (relative paths from there),
    or the configured one again. Raises ModelLoadError (answered 400) naming the folder otherwise."""
    if not requested:
        if configured is None:
            raise ModelLoadError("no checkpoint is configured (API_CHECKPOINT_PATH); name the one to load")
        return _regular(Path(os.path.realpath(configured)), configured, root=None)
    if root is None:
        raise ModelLoadError(
            "a swap loads checkpoints from the models folder, and none is set: set API_MODEL_REPOSITORY "
            "(or API_CHECKPOINT_PATH, whose folder is the models folder)"
        )
    asked = Path(requested).expanduser()
    resolved = Path(os.path.realpath(asked if asked.is_absolute() else root / asked))
    if not resolved.is_relative_to(root):
        raise ModelLoadError(f"{requested} is outside the models folder {root}; put the checkpoint there")
    return _regular(resolved, asked, root=root)


def _regular(resolved: Path, asked: Path, *, root: Path | None) -> Path:
    """`resolved` if it is a regular file, or a folder holding only regular files (inside `root`)."""
    try:
        mode = os.stat(resolved).st_mode
    except FileNotFoundError:
        raise ModelLoadError(f"no checkpoint at {asked}; give a path under the models folder {root}") from None
    except OSError as error:
        raise ModelLoadError(f"cannot read {asked}: {error.strerror}") from None
    if stat.S_ISDIR(mode):
        for folder, _, names in os.walk(resolved):
            for name in names:
                inner = Path(os.path.realpath(Path(folder) / name))
                if root is not None and not inner.is_relative_to(root):
                    raise ModelLoadError(f"{Path(folder) / name} leads outside the models folder {root}")
                _regular(inner, Path(folder) / name, root=root)
        return resolved
    if not stat.S_ISREG(mode):
        raise ModelLoadError(f"{asked} is {_kind(mode)}, not a checkpoint file or folder")
    return resolved


def _kind(mode: int) -> str:
    kinds = {stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device", stat.S_ISFIFO: "a FIFO"}
    return next((name for test, name in kinds.items() if test(mode)), "a socket" if stat.S_ISSOCK(mode) else "special")


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
