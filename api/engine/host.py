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
import dataclasses
import gc
import json
import logging
import pickle
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, generate_latest

from api.config import BatchingSettings, ModelSettings
from api.engine import wire
from api.engine.cpu import cpu_budget
from api.engine.device_resize import resize_mode
from api.engine.figures import EngineFigures
from api.engine.memory import release_free_memory
from api.engine.pipeline import BatchRun
from api.engine.service import Engine
from api.engine.swap import PREPARE_BYTES, checkpoint_bytes, device_room, host_room, incompatibility, resolve_checkpoint
from api.errors import ModelLoadError, StartupError, first_line

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class Frontend:
    sock: socket.socket
    index: int
    ring: wire.Ring | None = None
    closed: bool = False
    outbox: list[tuple[int, int, int, int, float, float]] = field(default_factory=list)
    # two inference threads (the served model and one being retired) may answer at once
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reply(self, row: tuple[int, int, int, int, float, float]) -> None:
        with self.lock:
            self.outbox.append(row)


@dataclass(eq=False)
class Swap:
    """A model load in progress: who asked, and which front-ends have yet to switch."""

    token: int
    requester: Frontend
    checkpoint: str
    started: float
    engine: Engine | None = None
    previous: int = 0
    switch_started: float = 0.0
    waiting: set[Frontend] = field(default_factory=set)
    dropped: int = 0  # front-ends disconnected for not switching in time


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
            self.frontend.reply((self.id, self.slot, wire.OK, run.size, run.forward_s, run.queued_s))

    def fail(self, error: BaseException) -> None:
        logger.error("forward pass failed: %s", first_line(error))
        self.frontend.reply((self.id, self.slot, wire.FAILED, 0, 0.0, 0.0))

    def drop(self) -> None:
        self.frontend.reply((self.id, self.slot, wire.DROPPED, 0, 0.0, 0.0))


class Host:
    def __init__(
        self,
        listener: socket.socket,
        model: ModelSettings,
        batching: BatchingSettings,
        linger_s: float,
        *,
        swapped_in: Path | None = None,
    ):
        self.listener = listener
        self.model = model  # its checkpoint_path is the configured one: a load without a path reads it again
        self.swapped_in = swapped_in  # started after a crash: the model swapped in last
        self.batching = batching
        self.linger_s = linger_s
        self.board = wire.Board.create()
        self.registry = CollectorRegistry(auto_describe=True)
        self.figures = EngineFigures(self.registry)
        self.figures.queue_depth.set_function(self.board.in_progress)
        self.frontends: dict[socket.socket, Frontend] = {}
        self._free = list(range(wire.MAX_FRONTENDS - 1, -1, -1))
        self._stop = threading.Event()
        self.engines: dict[int, Engine] = {}  # by generation: the served model, and any still retiring
        self.generation = 0
        self.hello: dict[str, Any] = {}
        self.pixel_bytes = 0  # the ring slots' pixel room, fixed by the first model
        self._swap: Swap | None = None
        self._loaded, self._wake = socket.socketpair()  # the loading thread wakes the main thread
        self._retiring: list[threading.Thread] = []

    @property
    def engine(self) -> Engine:
        return self.engines[self.generation]

    # --- lifetime ----------------------------------------------------------------------------------

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stop.set())
        try:
            first = (
                self.model
                if self.swapped_in is None
                else dataclasses.replace(self.model, checkpoint_path=self.swapped_in)
            )
            engine = self._start(first)
        except StartupError as error:
            self._refuse(str(error))
            return 3
        except Exception as error:
            logger.exception("model load failed unexpectedly")
            self._refuse(f"unexpected {type(error).__name__} while loading the model: {error}")
            return 3
        self.pixel_bytes = self._input_bytes(engine)
        self._serve_model(engine, generation=1)
        logger.info("engine ready: %s on %s", engine.classifier.architecture, engine.classifier.device)
        del engine  # self.engines holds it: a swap releases it
        try:
            self._serve()
        finally:
            for retiring in self._retiring:
                retiring.join()
            for served in self.engines.values():
                served.close()
        return 0

    def _start(self, model: ModelSettings) -> Engine:
        return Engine.start(
            model, self.batching, self.figures, on_its_way=self.board.on_its_way, after_batch=self._flush
        )

    def _serve_model(self, engine: Engine, generation: int) -> None:
        """`engine` answers every job tagged `generation` from now on; new front-ends get it."""
        classifier = engine.classifier
        self.engines[generation] = engine
        self.generation = generation
        self.hello = {
            "generation": generation,
            "served": engine.served.to_dict(),
            "describe": engine.describe(),
            "recipe": classifier.split.to_dict(),
            "reduce_to": classifier.resize_short_side if self.batching.reduced_decode else None,
            "ship_decoded_bytes": self._ship_decoded_bytes(engine),
            "pixel_bytes": self.pixel_bytes,
            "max_queue": self.batching.max_queue,
        }
        self.figures.on_model(engine.served)

    def _input_bytes(self, engine: Engine) -> int:
        """A ring slot holds the model's input, or a decoded image up to what may be shipped."""
        size = engine.classifier.input_size
        return max(3 * size[1] * size[2], self._ship_decoded_bytes(engine))

    def _ship_decoded_bytes(self, engine: Engine) -> int:
        """How large a decoded image the front-ends may ship for resizing here (0: they resize).

        Up to twice the resize target on each side: a reduced-scale JPEG decode (never below the
        target) of an ordinary photo fits; anything larger is resized by the front-end."""
        classifier = engine.classifier
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
        selector.register(self._loaded, selectors.EVENT_READ)
        alone_since = time.monotonic()
        while True:
            self._drop_stuck_frontends(selector)
            for key, _ in selector.select(timeout=0.2):
                if key.fileobj is self.listener:
                    self._accept(selector)
                elif key.fileobj is self._loaded:
                    self._loaded.recv(64)
                    self._switch_over()
                else:
                    self._read(selector, self.frontends[key.fileobj])  # type: ignore[index]
            if self.frontends:
                alone_since = time.monotonic()
            elif self._stop.is_set() or time.monotonic() - alone_since >= self.linger_s:
                if self._swap is not None and self._swap.engine is None:
                    continue  # a load is running: its thread finishes first
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
                layout = wire.Layout(self.pixel_bytes, len(self.hello["served"]["class_names"]))
                frontend.ring = wire.Ring(fds[0], slots, layout)
                held = wire.room_for_replies(frontend.sock, slots)
                if held < slots:
                    logger.warning(
                        "the socket to front-end %d holds %d of its %d replies (net.core.wmem_max is too low): "
                        "if it stops reading, batches wait for it; raise net.core.wmem_max to %d",
                        frontend.index,
                        max(held, 0),
                        slots,
                        (slots * wire.REPLY_MESSAGE_COST + (1 << 20)) // 2,
                    )
            elif kind == wire.METRICS:
                wire.send(frontend.sock, wire.METRICS, generate_latest(self.registry))
            elif kind == wire.LOAD:
                self._load(frontend, json.loads(payload))
            elif kind == wire.SWITCHED:
                self._switched(frontend)

    def _jobs(self, frontend: Frontend, records: np.ndarray) -> None:
        ring = frontend.ring
        assert ring is not None
        now = time.monotonic()
        generations = records["generation"]
        for generation in np.unique(generations):
            engine = self.engines.get(int(generation))
            batch = records if len(generations) == 1 else records[generations == generation]
            jobs = [
                RemoteJob(
                    frontend, record, ring.pixels(int(record["slot"]), int(record["height"]), int(record["width"])), now
                )
                for record in batch
            ]
            if engine is None:  # cannot happen: a model retires only once every front-end switched
                for job in jobs:
                    job.fail(RuntimeError(f"no model of generation {int(generation)} is loaded"))
                self._flush()
                continue
            engine.batcher.submit(jobs)

    def _leave(self, selector: selectors.BaseSelector, frontend: Frontend) -> None:
        frontend.closed = True  # its queued jobs are dropped; its ring goes with the last view of it
        selector.unregister(frontend.sock)
        with contextlib.suppress(OSError):  # wakes an inference thread blocked sending to it
            frontend.sock.shutdown(socket.SHUT_RDWR)
        with frontend.lock:  # never closed under a send
            frontend.sock.close()
        del self.frontends[frontend.sock]
        self.board.clear(frontend.index)
        self._free.append(frontend.index)
        if self._swap is not None:
            self._switched(frontend)

    # --- a model swap ---------------------------------------------------------------------------------

    def _load(self, frontend: Frontend, request: dict[str, Any]) -> None:
        """Load a model beside the served one, in a thread; `_switch_over` follows when it is ready."""
        token = int(request["token"])
        if self._swap is not None:
            swap = self._swap
            self._answer_load(
                frontend,
                token,
                409,
                error=f"a model load is already running (checkpoint {swap.checkpoint}, for "
                f"{time.monotonic() - swap.started:.0f}s); wait for it to finish",
            )
            return
        path = resolve_checkpoint(request.get("checkpoint"), self.model.checkpoint_path)
        swap = self._swap = Swap(token, frontend, str(path), time.monotonic())
        threading.Thread(target=self._load_beside, args=(swap, path), name="model-load", daemon=True).start()

    def _load_beside(self, swap: Swap, path: Path | None) -> None:
        served = self.engine.served
        logger.info("loading %s beside the served model (version %s)", path, served.version)
        try:
            if path is None or not path.exists():
                raise ModelLoadError(f"no checkpoint at {path}; give a path under the models folder")
            model = dataclasses.replace(self.model, checkpoint_path=path)
            aside = self._converts_aside(model)
            self._check_room(path, aside)
            if aside:
                self._prepare_aside(model)
            engine = self._start(model)
        except Exception as error:  # StartupError says why; anything else too: the served model stays
            if not isinstance(error, StartupError):
                logger.exception("model load failed unexpectedly")
            self._fail_swap(swap, first_line(error))
            return
        problem = incompatibility(
            served, engine.served, input_bytes=self._input_bytes(engine), slot_bytes=self.pixel_bytes
        )
        if problem is not None:
            engine.close()
            self._fail_swap(swap, problem)
            return
        swap.engine = engine
        self._wake.send(b"!")

    def _converts_aside(self, model: ModelSettings) -> bool:
        """On a CPU the new model may be converted to OpenVINO: seconds of work that would stall the
        served model's answers here (it holds Python's lock in long stretches), so a process of its
        own does it first (api/ops/prepare.py, at a lower priority), leaving it in the model cache."""
        return self.engine.classifier.device.type == "cpu" and model.runtime in ("auto", "openvino")

    def _prepare_aside(self, model: ModelSettings) -> None:
        threads = cpu_budget(self.batching.num_threads, workers=self.batching.workers).threads
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "api.ops.prepare", str(threads)], input=pickle.dumps(model), check=False
        )
        logger.info(
            "new model prepared in a process of its own in %.2fs (status %d)",
            time.perf_counter() - started,
            done.returncode,
        )

    def _check_room(self, path: Path, aside: bool) -> None:
        weights = checkpoint_bytes(path)
        rooms = [host_room(weights, extra=PREPARE_BYTES if aside else 0)]
        device = self.engine.classifier.device
        if device.type == "cuda":
            import torch

            rooms.append(device_room(weights, torch.cuda.mem_get_info(device)[0]))
        for room in rooms:
            if not room.fits:
                raise ModelLoadError(room.refusal())

    def _fail_swap(self, swap: Swap, reason: str) -> None:
        logger.error("model load failed, the served model (version %s) stays: %s", self.engine.served.version, reason)
        swap.engine = None
        self._answer_load(swap.requester, swap.token, 400, error=f"model load failed ({swap.checkpoint}): {reason}")
        self._swap = None  # last: a second load is refused until the answer is on its way

    def _switch_over(self) -> None:
        """The new model is warm: every front-end switches to it (main thread)."""
        swap = self._swap
        if swap is None or swap.engine is None:
            return
        swap.previous, swap.switch_started = self.generation, time.monotonic()
        self._serve_model(swap.engine, self.generation + 1)
        switch = {**self.hello}
        swap.waiting = set(self.frontends.values())
        for frontend in list(swap.waiting):
            try:
                wire.send_json(frontend.sock, wire.SWITCH, switch)
            except OSError:
                swap.waiting.discard(frontend)
        logger.info("switching to model version %s: %d front-ends", swap.engine.served.version, len(swap.waiting))
        self._switched(None)

    def _drop_stuck_frontends(self, selector: selectors.BaseSelector) -> None:
        """A front-end that has not switched within a request's deadline is stuck (its event loop
        does not run: any request it still holds for the old model is past its deadline anyway).
        It is disconnected, so that the old model can retire and the call be answered; it connects
        again by itself when it runs, and gets the new model."""
        swap = self._swap
        if swap is None or not swap.waiting:
            return
        late = time.monotonic() - swap.switch_started
        if late < self.batching.request_timeout_s:
            return
        for frontend in list(swap.waiting):
            reason = (
                f"front-end {frontend.index} did not confirm the switch to model version {self.engine.served.version} "
                f"within {late:.1f}s (API_REQUEST_TIMEOUT_S={self.batching.request_timeout_s:g}): disconnected"
            )
            logger.warning(reason)
            with contextlib.suppress(OSError):  # never wait on a front-end that does not read
                frontend.sock.send(wire.DROPPED_YOU + json.dumps({"reason": reason}).encode(), socket.MSG_DONTWAIT)
            swap.dropped += 1
            self._leave(selector, frontend)  # the last one out answers the call

    def _switched(self, frontend: Frontend | None) -> None:
        """A front-end switched (or left): once all have, the old model drains and the call is answered."""
        swap = self._swap
        if swap is None or swap.engine is None:
            return
        if frontend is not None:
            swap.waiting.discard(frontend)
        if swap.waiting:
            return
        self._swap = None
        old = self.engines.pop(swap.previous)
        previous_version = old.served.version
        # handed over in a list the thread empties: a thread's own args would hold the model until it ends
        retiring = threading.Thread(target=self._retire, args=([old],), name="model-retire", daemon=True)
        del old
        retiring.start()
        self._retiring = [t for t in self._retiring if t.is_alive()] + [retiring]
        now = time.monotonic()
        figures = {
            "version": swap.engine.served.version,
            "previous_version": previous_version,
            "checkpoint": swap.checkpoint,
            "load_s": round(swap.switch_started - swap.started, 3),
            "switch_s": round(now - swap.switch_started, 4),
            "total_s": round(now - swap.started, 3),
            "frontends_dropped": swap.dropped,
        }
        logger.info("model version %s serving (was %s)", figures["version"], figures["previous_version"], extra=figures)
        if not swap.requester.closed:
            self._answer_load(swap.requester, swap.token, 200, **figures)

    def _retire(self, holder: list[Engine]) -> None:
        """What was already queued for the old model finishes on it; then its memory goes."""
        old = holder.pop()
        version = old.served.version
        old.close()
        released = weakref.ref(old.classifier)
        del old
        if released() is not None:  # held in a reference cycle: collect it now, not at the next gc pass
            gc.collect()
        release_free_memory()
        outcome = "freed" if released() is None else "still referenced"
        logger.info("the previous model (version %s) drained and was released (%s)", version, outcome)

    def _answer_load(self, frontend: Frontend, token: int, status: int, **answer: Any) -> None:
        with contextlib.suppress(OSError):
            wire.send_json(frontend.sock, wire.LOADED, {"token": token, "status": status, **answer})

    # --- the inference threads, after each batch ----------------------------------------------------

    def _flush(self) -> None:
        for frontend in list(self.frontends.values()):
            with frontend.lock:
                if frontend.closed or not frontend.outbox:
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
