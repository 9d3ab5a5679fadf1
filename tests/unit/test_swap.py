"""A model swap's rules: which file (confined to the models folder, never a device or a FIFO), whether
both models fit, whether the new one can take over."""

from __future__ import annotations

import dataclasses
import os
import socket
from pathlib import Path

import numpy as np
import pytest

from api.engine.model.files.folds import weights_bytes
from api.errors import ModelLoadError
from api.remote import messages, wire
from api.remote.host.rules import (
    HEADROOM_BYTES,
    HOST_COPIES,
    MIB,
    PREPARE_BYTES,
    device_room,
    host_room,
    incompatibility,
    models_root,
    vet_checkpoint,
)
from tests.support import SERVED


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A models folder: the configured checkpoint, another one, a timm model folder, and traps."""
    models = tmp_path / "models"
    (models / "fold_0").mkdir(parents=True)
    (models / "fold_0" / "best_model.pt").write_bytes(b"x")
    (models / "fold_1.pt").write_bytes(b"y")
    (models / "v2").mkdir()
    (models / "v2" / "model.safetensors").write_bytes(b"z")
    os.mkfifo(models / "fifo")
    (models / "zero.pt").symlink_to("/dev/zero")
    (models / "passwd.pt").symlink_to("/etc/passwd")
    (models / "inside.pt").symlink_to(models / "fold_1.pt")
    (tmp_path / "secret.pt").write_bytes(b"s")
    (models / "leaky").mkdir()
    (models / "leaky" / "model.safetensors").symlink_to(tmp_path / "secret.pt")
    return models


def test_the_models_folder_is_the_repository_else_the_configured_checkpoints_folder(folder: Path) -> None:
    assert models_root(folder / "fold_0" / "best_model.pt", None) == folder / "fold_0"
    assert models_root(folder / "v2", None) == folder  # a timm model folder: the folder holding it
    assert models_root(folder / "fold_0" / "best_model.pt", folder) == folder
    assert models_root(None, None) is None


def test_checkpoints_resolve_inside_the_models_folder(folder: Path) -> None:
    configured = folder / "fold_0" / "best_model.pt"
    assert vet_checkpoint("fold_1.pt", configured, folder) == folder / "fold_1.pt"  # relative: from the folder
    assert vet_checkpoint(str(folder / "fold_1.pt"), configured, folder) == folder / "fold_1.pt"
    assert vet_checkpoint("v2", configured, folder) == folder / "v2"  # a timm model folder
    assert vet_checkpoint("inside.pt", configured, folder) == folder / "fold_1.pt"  # a symlink that stays inside
    assert vet_checkpoint("fold_0/../fold_1.pt", configured, folder) == folder / "fold_1.pt"
    assert vet_checkpoint(None, configured, folder) == configured  # the configured one, read again


@pytest.mark.parametrize(
    ("requested", "why"),
    [
        ("/dev/zero", "outside the models folder"),
        ("/dev/urandom", "outside the models folder"),
        ("/etc/passwd", "outside the models folder"),
        ("/proc/self/environ", "outside the models folder"),
        ("../../../../etc/passwd", "outside the models folder"),
        ("fold_0/../../secret.pt", "outside the models folder"),
        ("zero.pt", "outside the models folder"),  # a symlink out: resolved first
        ("passwd.pt", "outside the models folder"),
        ("leaky", "leads outside the models folder"),  # a folder with a file linking out
        ("fifo", "is a FIFO"),  # never opened: opening a FIFO would wait for a writer
        ("missing.pt", "no checkpoint at missing.pt"),
    ],
)
def test_anything_else_is_refused_before_a_byte_is_read(folder: Path, requested: str, why: str) -> None:
    with pytest.raises(ModelLoadError, match=why) as refused:
        vet_checkpoint(requested, folder / "fold_0" / "best_model.pt", folder)
    if "outside" in why:
        assert str(folder) in str(refused.value)  # it names the folder


def test_a_device_inside_the_models_folder_is_refused(folder: Path) -> None:
    with pytest.raises(ModelLoadError, match="character device"):
        vet_checkpoint("/dev/null", None, Path("/dev"))


def test_without_a_models_folder_a_swap_needs_one(folder: Path) -> None:
    with pytest.raises(ModelLoadError, match="API_MODEL_REPOSITORY"):
        vet_checkpoint("fold_1.pt", None, None)


def test_room_counts_both_models_and_the_containers_limit(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 8000000 kB\nMemAvailable: 4000000 kB\n")
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    (cgroup / "memory.max").write_text("max\n")
    (cgroup / "memory.current").write_text("0\n")
    weights = 100 * MIB
    room = host_room(weights, meminfo=meminfo, cgroup=cgroup)
    assert room.needed == weights * HOST_COPIES + HEADROOM_BYTES and room.free == 4000000 * 1024 and room.fits
    (cgroup / "memory.max").write_text(str(1024 * MIB))
    (cgroup / "memory.current").write_text(str(900 * MIB))  # the container has 124 MiB left
    tight = host_room(weights, meminfo=meminfo, cgroup=cgroup)
    assert tight.free == 124 * MIB and not tight.fits
    assert "needs about 556 MiB and 124 MiB is free" in tight.refusal()
    assert (
        host_room(weights, extra=PREPARE_BYTES, meminfo=meminfo, cgroup=cgroup).needed == tight.needed + PREPARE_BYTES
    )
    assert not device_room(weights, free=300 * MIB).fits and device_room(weights, free=1024 * MIB).fits


def test_checkpoint_size_counts_a_folders_files(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / "config.json").write_bytes(b"{}")
    assert weights_bytes(tmp_path) == 1002 and weights_bytes(tmp_path / "config.json") == 2
    sparse = tmp_path / "sparse.pt"
    with sparse.open("wb") as file:
        file.truncate(20 << 30)  # 20 GiB that take no disk: its size comes from the file system, unread
    assert weights_bytes(sparse) == 20 << 30


def test_checkpoint_size_of_a_folder_of_folds_counts_each_folds_checkpoint(tmp_path: Path) -> None:
    for fold in range(3):
        (tmp_path / f"fold_{fold}").mkdir()
        (tmp_path / f"fold_{fold}" / "best_model.pt").write_bytes(b"x" * (100 + fold))
        (tmp_path / f"fold_{fold}" / "train.log").write_bytes(b"y" * 5000)  # not a checkpoint
    assert weights_bytes(tmp_path) == 303
    assert weights_bytes(tmp_path / "fold_*" / "best_model.pt") == 303


def test_the_new_model_must_keep_the_label_set() -> None:
    same = dataclasses.replace(SERVED, architecture="convnext_base", checkpoint_sha256="b" * 64)
    assert incompatibility(SERVED, same, input_bytes=10, slot_bytes=10) is None  # another architecture is fine
    fewer = dataclasses.replace(SERVED, class_names=("abyssinian", "bengal"), checkpoint_sha256="b" * 64)
    assert "2 classes instead of 3" in str(incompatibility(SERVED, fewer, input_bytes=10, slot_bytes=10))
    renamed = dataclasses.replace(SERVED, class_names=("abyssinian", "bengal", "bombay"), checkpoint_sha256="b" * 64)
    assert "label 2 is 'bombay' instead of 'birman'" in str(
        incompatibility(SERVED, renamed, input_bytes=10, slot_bytes=10)
    )
    multi = dataclasses.replace(SERVED, checkpoint_sha256="b" * 64, multi_label=True)
    assert "API_MULTI_LABEL" in str(incompatibility(SERVED, multi, input_bytes=10, slot_bytes=10))
    assert "larger than" in str(incompatibility(SERVED, same, input_bytes=11, slot_bytes=10))


@pytest.mark.parametrize("slots", [64, 1024, 4096])
def test_the_engines_socket_holds_a_reply_per_slot_for_a_front_end_that_stops_reading(slots: int) -> None:
    """A front-end stuck mid-swap reads nothing: every reply the engine owes it (one per slot at
    most) must fit in the socket without waiting, or the inference thread would block on it."""
    engine_end, frontend_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with engine_end, frontend_end:
        held = wire.room_for_replies(engine_end, slots)
        limit = int(Path("/proc/sys/net/core/wmem_max").read_text())
        if held < slots:
            pytest.skip(f"net.core.wmem_max={limit} is too low for {slots} replies (the engine warns)")
        reply = messages.encode(messages.Replies(np.zeros(1, messages.REPLY).tobytes()))
        for sent in range(slots):
            try:
                engine_end.send(reply, socket.MSG_DONTWAIT)
            except BlockingIOError:
                pytest.fail(f"the socket took {sent} of {slots} replies, not all (it said it holds {held})")
