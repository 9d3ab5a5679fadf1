"""A CPU engine process resizes a shipped image as it arrives; one it cannot resize fails that job
alone, and the engine goes on serving (a real engine process, fed through a shared-memory ring as a
front-end feeds it)."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from api.config import load_settings
from api.remote import messages, wire
from api.remote.entrypoints import EngineConfig
from api.remote.frontend.spawner import EngineSpawner
from api.remote.messages import FAILED, OK


@pytest.fixture
def engine(tiny_checkpoint: Path, tmp_path: Path) -> Iterator[tuple[socket.socket, messages.Hello, wire.Ring]]:
    settings = load_settings(
        checkpoint_path=tiny_checkpoint, model_name="test_resnet", runtime="torch", device="cpu", cache_dir=tmp_path
    )
    address = wire.address(f"test-resize-{os.getpid()}", "cpu")
    spawner = EngineSpawner(address, EngineConfig.from_settings(settings, linger_s=0.0, log_dir=None))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        deadline = time.monotonic() + 120
        while True:  # the engine binds its socket first, then loads: connect as a front-end does
            try:
                sock.connect(address)
                break
            except (ConnectionRefusedError, FileNotFoundError):
                assert time.monotonic() < deadline, "no engine"
                spawner()
                time.sleep(0.05)
        sock.settimeout(120)
        hello, _ = wire.receive(sock)
        assert isinstance(hello, messages.Hello), hello
        assert hello.model.ship_decoded_bytes > 0, "a CPU engine takes decoded images by default (API_PREPROCESS=auto)"
        classes = hello.model.served.num_classes
        ring = wire.Ring.create(4, wire.Layout(hello.pixel_bytes, classes))
        wire.send(sock, messages.Attach(4, hello.pixel_bytes, classes), fds=(ring.fd,))
        yield sock, hello, ring
    finally:
        sock.close()
        spawner.wait(30)


def _ask(sock: socket.socket, generation: int, jobs: list[tuple[int, int, int, int]]) -> dict[int, np.void]:
    """Send (id, slot, height, width) jobs of decoded images; their replies by id."""
    records = np.zeros(len(jobs), dtype=messages.JOB)
    for row, (job, slot, height, width) in enumerate(jobs):
        records[row] = (job, slot, height, width, time.monotonic() + 60, 1, b"")
    for message in messages.jobs(generation, records):
        wire.send(sock, message)
    answered: dict[int, np.void] = {}
    while len(answered) < len(jobs):
        message, _ = wire.receive(sock)
        if isinstance(message, messages.Replies):
            answered.update({int(reply["id"]): reply for reply in message.rows()})
    return answered


def test_a_shipped_image_is_resized_on_arrival_and_a_bad_one_fails_alone(
    engine: tuple[socket.socket, messages.Hello, wire.Ring], chelsea_jpeg: bytes
) -> None:
    sock, hello, ring = engine
    photo = np.random.default_rng(0).integers(0, 256, (300, 451, 3), dtype=np.uint8)
    ring.pixels(0, 300, 451)[...] = photo
    ring.pixels(1, 300, 451)[...] = photo
    answered = _ask(sock, hello.model.generation, [(1, 0, 300, 451), (2, 1, 0, 451), (3, 1, 300, 451)])
    assert int(answered[1]["status"]) == OK and int(answered[3]["status"]) == OK
    assert int(answered[2]["status"]) == FAILED  # a 451x0 image: no pixels to resize
    np.testing.assert_array_equal(ring.scores(0), ring.scores(1))  # the same photo, the same scores
    assert ring.scores(0)[: hello.model.served.num_classes].sum() == pytest.approx(1.0, abs=1e-4)
    # and the engine serves on
    assert int(_ask(sock, hello.model.generation, [(4, 0, 300, 451)])[4]["status"]) == OK
