"""A model swap's rules: which file, whether both models fit, whether the new one can take over."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
from api.engine.swap import (
    HEADROOM_BYTES,
    HOST_COPIES,
    MIB,
    PREPARE_BYTES,
    checkpoint_bytes,
    device_room,
    host_room,
    incompatibility,
    resolve_checkpoint,
)

from api.engine import wire
from api.engine.pipeline import Served

SERVED = Served("resnet50", ("abyssinian", "bengal", "birman"), "cpu", "a" * 64)


def test_relative_paths_are_read_from_the_configured_checkpoints_folder(tmp_path: Path) -> None:
    configured = tmp_path / "fold_0" / "best_model.pt"
    configured.parent.mkdir()
    configured.write_bytes(b"x")
    assert resolve_checkpoint("fold_1.pt", configured) == tmp_path / "fold_0" / "fold_1.pt"
    assert resolve_checkpoint("/elsewhere/m.pt", configured) == Path("/elsewhere/m.pt")
    assert resolve_checkpoint(None, configured) == configured  # the configured one, read again
    assert resolve_checkpoint("v2", tmp_path) == tmp_path / "v2"  # a timm model folder


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
    assert checkpoint_bytes(tmp_path) == 1002 and checkpoint_bytes(tmp_path / "config.json") == 2


def test_the_new_model_must_keep_the_label_set() -> None:
    same = Served("convnext_base", SERVED.class_names, "cpu", "b" * 64)
    assert incompatibility(SERVED, same, input_bytes=10, slot_bytes=10) is None  # another architecture is fine
    fewer = Served("resnet50", ("abyssinian", "bengal"), "cpu", "b" * 64)
    assert "2 classes instead of 3" in str(incompatibility(SERVED, fewer, input_bytes=10, slot_bytes=10))
    renamed = Served("resnet50", ("abyssinian", "bengal", "bombay"), "cpu", "b" * 64)
    assert "label 2 is 'bombay' instead of 'birman'" in str(
        incompatibility(SERVED, renamed, input_bytes=10, slot_bytes=10)
    )
    multi = Served("resnet50", SERVED.class_names, "cpu", "b" * 64, multi_label=True)
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
        reply = wire.REPLIES + np.zeros(1, wire.REPLY).tobytes()
        for sent in range(slots):
            try:
                engine_end.send(reply, socket.MSG_DONTWAIT)
            except BlockingIOError:
                pytest.fail(f"the socket took {sent} of {slots} replies, not all (it said it holds {held})")
