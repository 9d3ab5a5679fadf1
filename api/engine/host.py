"""The engine process: one per device, the model loaded once, batching across every front-end.

    front-ends --JOBS--> [main thread: socket reader] --submit--> Batcher (the same code as in one
    process: api/engine/batching.py) --forward--> scores written into each front-end's ring slot
    --REPLIES--> front-ends

The main thread accepts front-ends, reads their job records and turns each into a `RemoteJob` whose
pixels are a view of the front-end's shared-memory slot (no copy until the batch is stacked). The
inference thread runs the batches and, after each, sends every front-end one message with its
replies. The process lives while front-ends are connected: it ends once none has been for
`linger_s` (a dev server's reload reconnects within it, so the model is not loaded again), at once
after SIGTERM/SIGINT when the last has gone, and when the front-end that owns it (`linger_s=0`) leaves.
"""

from __future__ import annotations

import contextlib
import json
import logging
import selectors
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, generate_latest

from api.config import BatchingSettings, ModelSettings
from api.engine import wire
from api.engine.device_resize import resize_mode
from api.engine.figures import EngineFigures
from api.engine.pipeline import BatchRun
from api.engine.service import Engine
from api.errors import StartupError, first_line

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class Frontend:
    sock: socket.socket
    index: int
    ring: wire.Ring | None = None
    closed: bool = False
    outbox: list[tuple[int, int, int, int, float, float]] = field(default_factory=list)


class RemoteJob:
    """One image of a front-end: its pixels are that front-end's slot, its answer goes back there."""

    __slots__ = ("deadline", "frontend", "id", "pixels", "queued_at", "slot")

    def __init__(self, frontend: Frontend, record: np.void, pixels: np.ndarray, now: float):
        self.frontend = frontend
        self.id = int(record["id"])
        self.slot = int(record["slot"])
        self.deadline = float(record["deadline"])
        self.pixels = pixels
        self.queued_at = now

    @property
    def abandoned(self) -> bool:
        ring = self.frontend.ring
        return (
            self.frontend.closed
            or ring is None
            or ring.state[self.slot] == wire.ABANDONED
            or time.monotonic() > self.deadline
        )

    def deliver(self, scores: np.ndarray, run: BatchRun) -> None:
        ring = self.frontend.ring
        if ring is not None and not self.frontend.closed:
            ring.scores(self.slot)[:] = scores
            self.frontend.outbox.append((self.id, self.slot, wire.OK, run.size, run.forward_s, run.queued_s))

    def fail(self, error: BaseException) -> None:
        logger.error("forward pass failed: %s", first_line(error))
        self.frontend.outbox.append((self.id, self.slot, wire.FAILED, 0, 0.0, 0.0))

    def drop(self) -> None:
        self.frontend.outbox.append((self.id, self.slot, wire.DROPPED, 0, 0.0, 0.0))


class Host:
    def __init__(self, listener: socket.socket, model: ModelSettings, batching: BatchingSettings, linger_s: float):
        self.listener = listener
        self.model = model
        self.batching = batching
        self.linger_s = linger_s
        self.board = wire.Board.create()
        self.registry = CollectorRegistry(auto_describe=True)
        self.figures = EngineFigures(self.registry)
        self.figures.queue_depth.set_function(self.board.in_progress)
        self.frontends: dict[socket.socket, Frontend] = {}
        self._free = list(range(wire.MAX_FRONTENDS - 1, -1, -1))
        self._dirty: set[Frontend] = set()
        self._stop = threading.Event()
        self.engine: Engine | None = None
        self.hello: dict[str, Any] = {}

    # --- lifetime ----------------------------------------------------------------------------------

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stop.set())
        try:
            self.engine = Engine.start(
                self.model, self.batching, self.figures, on_its_way=self.board.on_its_way, after_batch=self._flush
            )
        except StartupError as error:
            self._refuse(str(error))
            return 3
        except Exception as error:
            logger.exception("model load failed unexpectedly")
            self._refuse(f"unexpected {type(error).__name__} while loading the model: {error}")
            return 3
        classifier = self.engine.classifier
        ship = self._ship_decoded_bytes()
        self.hello = {
            "served": self.engine.served.to_dict(),
            "describe": self.engine.describe(),
            "recipe": classifier.split.to_dict(),
            "reduce_to": classifier.resize_short_side if self.batching.reduced_decode else None,
            "ship_decoded_bytes": ship,
            # a ring slot holds the model's input, or a decoded image up to what may be shipped
            "pixel_bytes": max(3 * classifier.input_size[1] * classifier.input_size[2], ship),
            "max_queue": self.batching.max_queue,
        }
        logger.info("engine ready: %s on %s", classifier.architecture, classifier.device)
        try:
            self._serve()
        finally:
            self.engine.close()
        return 0

    def _ship_decoded_bytes(self) -> int:
        """How large a decoded image the front-ends may ship for resizing here (0: they resize).

        Up to twice the resize target on each side: a reduced-scale JPEG decode (never below the
        target) of an ordinary photo fits; anything larger is resized by the front-end."""
        assert self.engine is not None
        classifier = self.engine.classifier
        where = self.batching.preprocess
        on_engine = where == "engine" or (where == "auto" and classifier.device.type == "cuda")
        if not on_engine or resize_mode(classifier.split) is None:
            return 0
        side = 2 * classifier.resize_short_side
        return 3 * side * side * 3 // 2

    def _refuse(self, reason: str) -> None:
        """The load failed: tell every front-end waiting (and any that connects right now), then end."""
        self.listener.setblocking(False)
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                time.sleep(0.02)
                continue
            with contextlib.suppress(OSError):
                wire.send_json(sock, wire.FAILED_LOAD, {"error": reason})
            sock.close()

    def _serve(self) -> None:
        selector = selectors.DefaultSelector()
        self.listener.setblocking(False)
        selector.register(self.listener, selectors.EVENT_READ)
        alone_since = time.monotonic()
        while True:
            for key, _ in selector.select(timeout=0.2):
                if key.fileobj is self.listener:
                    self._accept(selector)
                else:
                    self._read(selector, self.frontends[key.fileobj])  # type: ignore[index]
            if self.frontends:
                alone_since = time.monotonic()
            elif self._stop.is_set() or time.monotonic() - alone_since >= self.linger_s:
                logger.info("engine stopping: no front-end is connected")
                return

    def _accept(self, selector: selectors.BaseSelector) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            if not self._free:
                wire.send_json(sock, wire.FAILED_LOAD, {"error": f"more than {wire.MAX_FRONTENDS} front-ends"})
                sock.close()
                continue
            sock.setblocking(True)  # sends wait for room (an answer is never dropped); reads never wait
            frontend = Frontend(sock, self._free.pop())
            self.board.clear(frontend.index)
            self.frontends[sock] = frontend
            selector.register(sock, selectors.EVENT_READ)
            try:
                wire.send_json(sock, wire.HELLO, {**self.hello, "index": frontend.index}, fds=(self.board.fd,))
            except OSError:  # it went away while we loaded
                self._leave(selector, frontend)

    def _read(self, selector: selectors.BaseSelector, frontend: Frontend) -> None:
        while True:
            try:
                message, fds = wire.receive(frontend.sock, wait=False)
            except BlockingIOError:
                return
            except OSError:
                message, fds = b"", []
            if not message:
                self._leave(selector, frontend)
                return
            kind, payload = message[:1], message[1:]
            if kind == wire.JOBS and frontend.ring is not None:
                self._jobs(frontend, np.frombuffer(payload, wire.REQUEST))
            elif kind == wire.ATTACH and fds:
                slots = int(json.loads(payload)["slots"])
                layout = wire.Layout(int(self.hello["pixel_bytes"]), len(self.hello["served"]["class_names"]))
                frontend.ring = wire.Ring(fds[0], slots, layout)
            elif kind == wire.METRICS:
                wire.send(frontend.sock, wire.METRICS, generate_latest(self.registry))

    def _jobs(self, frontend: Frontend, records: np.ndarray) -> None:
        ring = frontend.ring
        assert ring is not None and self.engine is not None
        now = time.monotonic()
        jobs = [
            RemoteJob(
                frontend, record, ring.pixels(int(record["slot"]), int(record["height"]), int(record["width"])), now
            )
            for record in records
        ]
        self.engine.batcher.submit(jobs)

    def _leave(self, selector: selectors.BaseSelector, frontend: Frontend) -> None:
        frontend.closed = True  # its queued jobs are dropped; its ring goes with the last view of it
        selector.unregister(frontend.sock)
        frontend.sock.close()
        del self.frontends[frontend.sock]
        self.board.clear(frontend.index)
        self._free.append(frontend.index)

    # --- the inference thread, after each batch -----------------------------------------------------

    def _flush(self) -> None:
        for frontend in list(self.frontends.values()):
            if not frontend.outbox:
                continue
            outbox, frontend.outbox = frontend.outbox, []
            records = np.zeros(len(outbox), dtype=wire.REPLY)
            for name, column in zip(
                ("id", "slot", "status", "size", "forward_s", "queued_s"), zip(*outbox, strict=True), strict=True
            ):
                records[name] = column
            try:
                for chunk in wire.chunks(records):
                    wire.send(frontend.sock, wire.REPLIES, chunk)
            except OSError:
                frontend.closed = True
