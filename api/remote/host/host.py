"""The engine process: one per device, the model loaded once, batching across every front-end.

    front-ends --Jobs--> [main thread: socket reader] --submit--> Batcher (the same code as in one
    process: api/engine/serving/batching.py) --forward--> scores written into each front-end's ring slot
    --Replies--> front-ends

The main thread accepts front-ends, reads their messages (api/remote/messages.py) and turns each job
record into a `RemoteJob` whose pixels are a view of the front-end's shared-memory slot (no copy
until the batch is stacked). The inference thread runs the batches and, after each, sends every
front-end one message with its replies. Every HEARTBEAT_S the main thread tells each front-end how
many batches have run, so that a front-end sees an engine that stalls (api/remote/frontend/supervisor.py).
A model swap is api/remote/host/swapper.py; this module does what it asks.

The process lives while front-ends are connected: it ends once none has been for `linger_s` (a dev
server's reload reconnects within it, so the model is not loaded again), at once after SIGTERM/SIGINT
when the last has gone, and when the front-end that owns it (`linger_s=0`) leaves.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import itertools
import logging
import os
import queue
import selectors
import signal
import socket
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from prometheus_client import CollectorRegistry, generate_latest

from api.config import ModelSettings
from api.cpu import cpu_budget
from api.engine.memory import release_free_memory
from api.engine.model.choice import MeasurementNeeded
from api.engine.serving.figures import EngineFigures
from api.engine.serving.service import Engine
from api.errors import EXIT_LOAD_FAILED, ModelLoadError, StartupError, first_line
from api.remote import wire
from api.remote.entrypoints import EngineConfig
from api.remote.host.aside import AsideFailed
from api.remote.host.explainer import Explanations
from api.remote.host.explainer import Request as ExplainRequest
from api.remote.host.explainer import send_answer as explained
from api.remote.host.frontends import Frontend, RemoteJob
from api.remote.host.prepare import prepare_beside
from api.remote.host.rules import (
    incompatibility,
    models_root,
    vet_checkpoint,
)
from api.remote.host.swapper import Swapper
from api.remote.messages import (
    HEARTBEAT_S,
    Attach,
    Dropped,
    Explain,
    Explained,
    Heartbeat,
    Hello,
    Jobs,
    Load,
    Loaded,
    MalformedMessage,
    Message,
    Metrics,
    MetricsAsk,
    ModelOffer,
    Refused,
    Switch,
    Switched,
)

logger = logging.getLogger(__name__)

MAX_SLOTS = 1 << 16


class Host:
    def __init__(self, listener: socket.socket, config: EngineConfig):
        self.listener = listener
        self.config = config
        self.model = config.model  # its checkpoint_path is the configured one: a load without a path reads it again
        self.batching = config.batching
        self.root = models_root(config.model.checkpoint_path, config.model_repository)
        self.board = wire.Board.create()
        self.registry = CollectorRegistry(auto_describe=True)
        self.figures = EngineFigures(self.registry)
        self.figures.queue_depth.set_function(self.board.in_progress)
        self.frontends: dict[socket.socket, Frontend] = {}
        self._free = list(range(wire.MAX_FRONTENDS - 1, -1, -1))
        self._stop = threading.Event()
        self._selector = selectors.DefaultSelector()
        self.engines: dict[int, Engine] = {}  # by generation: the served model, and any still retiring
        self.generation = 0
        self.offer: ModelOffer | None = None
        self.pixel_bytes = 0  # the ring slots' least pixel room, fixed by the first model
        self.swapper = Swapper(
            self, load_timeout_s=config.load_timeout_s, switch_timeout_s=config.batching.request_timeout_s
        )
        self._calls: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._woken, self._wake = socket.socketpair()  # other threads hand the main thread work
        self._batches = itertools.count(1)
        self.progress = 0  # batches run (the heartbeat's progress counter)
        self._retiring: list[threading.Thread] = []
        self.explanations = Explanations(config.batching.max_explanations)

    @property
    def engine(self) -> Engine:
        return self.engines[self.generation]

    # --- lifetime ----------------------------------------------------------------------------------

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stop.set())
        swapped_in = self.config.swapped_in
        first = self.model if swapped_in is None else dataclasses.replace(self.model, checkpoint_path=swapped_in)
        try:
            engine = self._first(first)
        except StartupError as error:
            self._refuse(str(error))
            return EXIT_LOAD_FAILED
        except Exception as error:
            logger.exception("model load failed unexpectedly")
            self._refuse(f"unexpected {type(error).__name__} while loading the model: {error}")
            return EXIT_LOAD_FAILED
        self.pixel_bytes = self._input_bytes(engine)
        self._serve_model(engine, generation=1)
        logger.info("engine ready: %s on %s", engine.classifier.architecture, engine.classifier.device)
        del engine  # self.engines holds it: a swap releases it
        try:
            self._serve()
        finally:
            self.explanations.close()
            for retiring in self._retiring:
                retiring.join()
            for served in self.engines.values():
                served.close()
        return 0

    def _start(self, model: ModelSettings, *, measure: bool = False) -> Engine:
        return Engine.start(
            model,
            self.batching,
            self.figures,
            on_its_way=self.board.on_its_way,
            after_batch=self._flush,
            measure=measure,
        )

    def _first(self, model: ModelSettings) -> Engine:
        """The first model. On a CPU whose runtimes were not measured for it yet (the model cache says),
        its prepare process measures them first, as a swap's does; this process reads the outcome."""
        try:
            return self._start(model)
        except MeasurementNeeded as needed:
            logger.info("runtime: measuring the candidates in a process of its own first (%s)", needed)
        threads = cpu_budget(self.batching.num_threads, workers=self.batching.workers).threads
        deadline = time.monotonic() + self.config.load_timeout_s
        try:
            prepare_beside(model, torch.device("cpu"), threads=threads, deadline=deadline, cancel=self._stop)
        except AsideFailed as failed:
            raise ModelLoadError(str(failed)) from None
        return self._start(model, measure=True)  # measures here only if the cache could not keep it

    def _serve_model(self, engine: Engine, generation: int) -> None:
        """`engine` answers every job tagged `generation` from now on; new front-ends get it."""
        classifier = engine.classifier
        if classifier.device.type == "cpu" and classifier.runtime.name != "torch":
            # torch only resizes shipped images here (this thread) and soft-maxes beside another
            # runtime's threads: an OpenMP team's spin-waits after each call would take the CPU those
            # threads need (measured: 3.4 ms of engine CPU per photo resized with two threads, 0.8 with one)
            torch.set_num_threads(1)
        self.engines[generation] = engine
        self.generation = generation
        self.offer = ModelOffer(
            generation=generation,
            served=engine.served,
            recipe=classifier.split,
            reduce_to=classifier.resize_short_side if self.batching.reduced_decode else None,
            ship_decoded_bytes=engine.classifier.ship_decoded_bytes(self.batching.preprocess),
            described=engine.describe(),
        )
        self.figures.on_model(engine.served)

    def _input_bytes(self, engine: Engine) -> int:
        """A ring slot holds the model's input, or a decoded image up to what may be shipped."""
        size = engine.classifier.input_size
        return max(3 * size[1] * size[2], engine.classifier.ship_decoded_bytes(self.batching.preprocess))

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
                wire.send(sock, Refused(reason))
            sock.close()

    def _serve(self) -> None:
        selector = self._selector
        self.listener.setblocking(False)
        selector.register(self.listener, selectors.EVENT_READ)
        selector.register(self._woken, selectors.EVENT_READ)
        alone_since = beat_at = time.monotonic()
        while True:
            for key, _ in selector.select(timeout=HEARTBEAT_S / 2):
                if key.fileobj is self.listener:
                    self._accept()
                elif key.fileobj is self._woken:
                    self._run_calls()
                else:
                    self._read(self.frontends[key.fileobj])  # type: ignore[index]
            now = time.monotonic()
            self.swapper.tick(now)
            if now - beat_at >= HEARTBEAT_S:
                self._heartbeat()
                beat_at = now
            if self.frontends:
                alone_since = now
            elif self._stop.is_set() or now - alone_since >= self.config.linger_s:
                if self.swapper.swap is not None:
                    continue  # a swap is running: its threads finish first
                logger.info("engine stopping: no front-end is connected")
                return

    def _run_calls(self) -> None:
        self._woken.recv(4096)
        while True:
            try:
                call = self._calls.get_nowait()
            except queue.Empty:
                return
            call()

    def call_soon(self, call: Callable[[], None]) -> None:
        """Run `call` on the main thread (from any thread)."""
        self._calls.put(call)
        with contextlib.suppress(OSError):
            self._wake.send(b"!")

    def _heartbeat(self) -> None:
        """Tell every front-end how far the batches got; never wait for one (nor for a thread sending
        it replies: those say as much)."""
        beat = Heartbeat(self.progress)
        for frontend in list(self.frontends.values()):
            if frontend.lock.acquire(blocking=False):
                try:
                    wire.send(frontend.sock, beat, flags=socket.MSG_DONTWAIT)
                except OSError:
                    pass
                finally:
                    frontend.lock.release()

    # --- front-ends --------------------------------------------------------------------------------

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            if not self._free:
                wire.send(sock, Refused(f"more than {wire.MAX_FRONTENDS} front-ends"))
                sock.close()
                continue
            sock.setblocking(True)  # sends wait for room (an answer is never dropped); reads never wait
            frontend = Frontend(sock, self._free.pop())
            self.board.clear(frontend.index)
            self.frontends[sock] = frontend
            self._selector.register(sock, selectors.EVENT_READ)
            assert self.offer is not None
            hello = Hello(frontend.index, self.batching.max_queue, self.pixel_bytes, self.offer)
            try:
                wire.send(sock, hello, fds=(self.board.fd,))
            except OSError:  # it went away while we loaded
                self._leave(frontend)

    def _read(self, frontend: Frontend) -> None:
        while not frontend.closed:
            fds: list[int] = []
            try:
                message, fds = wire.receive(frontend.sock, wait=False)
            except BlockingIOError:
                return
            except MalformedMessage as error:
                self.drop(frontend, f"front-end {frontend.index} sent {error}: disconnected")
                return
            except OSError:
                message = None
            if message is None:
                self._leave(frontend)
                return
            kept = self._handle(frontend, message, fds)
            for fd in fds:
                if fd != kept:
                    os.close(fd)

    def _handle(self, frontend: Frontend, message: Message, fds: list[int]) -> int | None:
        """Act on one message; answers the descriptor it kept, if any."""
        if isinstance(message, Jobs):
            self._jobs(frontend, message)
        elif isinstance(message, Attach) and fds:
            return self._attach(frontend, message, fds[0])
        elif isinstance(message, MetricsAsk):
            wire.send(frontend.sock, Metrics(generate_latest(self.registry)))
        elif isinstance(message, Load):
            self.swapper.request(frontend, message.token, message.checkpoint, self.engine.served.version)
        elif isinstance(message, Switched):
            self.swapper.switched(frontend)
        elif isinstance(message, Explain):
            self._explain(frontend, message)
        else:
            logger.warning(
                "front-end %d sent %s, which goes the other way: ignored", frontend.index, type(message).__name__
            )
        return None

    def _attach(self, frontend: Frontend, attach: Attach, fd: int) -> int | None:
        classes = self.engine.served.num_classes
        problem = None
        if attach.classes != classes or attach.pixel_bytes < self.pixel_bytes or not 0 < attach.slots <= MAX_SLOTS:
            problem = (
                f"its ring ({attach.slots} slots of {attach.pixel_bytes} pixel bytes, {attach.classes} classes) does "
                f"not fit the served model ({self.pixel_bytes} pixel bytes, {classes} classes)"
            )
        else:
            try:
                frontend.ring = wire.Ring(fd, attach.slots, wire.Layout(attach.pixel_bytes, attach.classes))
            except (ValueError, OSError) as error:
                problem = f"its ring cannot be mapped ({error})"
        if problem is not None:
            self.drop(frontend, f"front-end {frontend.index}: {problem}; disconnected")
            return None
        held = wire.room_for_replies(frontend.sock, attach.slots)
        if held < attach.slots:
            logger.warning(
                "the socket to front-end %d holds %d of its %d replies (net.core.wmem_max is too low): "
                "if it stops reading, batches wait for it; raise net.core.wmem_max to %d",
                frontend.index,
                max(held, 0),
                attach.slots,
                (attach.slots * wire.REPLY_MESSAGE_COST + (1 << 20)) // 2,
            )
        return fd

    def _jobs(self, frontend: Frontend, message: Jobs) -> None:
        ring = frontend.ring
        if ring is None:
            return
        now = time.monotonic()
        rows = message.rows()
        engine = self.engines.get(message.generation)
        # on a CPU a shipped image is resized as it arrives, beside the batch running; a GPU resizes
        # the batch's images together, in the forward pass
        on_arrival = engine is not None and engine.classifier.device.type == "cpu"
        jobs, refused = [], []
        for row in rows:
            slot, height, width = int(row["slot"]), int(row["height"]), int(row["width"])
            if slot >= ring.slots or height * width * 3 > ring.layout.pixel_bytes:
                refused.append((row, f"job {int(row['id'])} points outside its ring"))
            elif engine is None:  # cannot happen: a model retires only once every front-end switched
                refused.append((row, f"no model of generation {message.generation} is loaded"))
            else:
                pixels = ring.pixels(slot, height, width)
                if on_arrival and row["resize"]:
                    try:
                        pixels = engine.classifier.resize_crop(pixels)
                    except Exception as error:  # that image fails, never this thread (as a failed batch)
                        refused.append((row, f"resizing a {width}x{height} image failed: {first_line(error)}"))
                        continue
                jobs.append(RemoteJob(frontend, row, pixels, now))
        for row, reason in refused:
            RemoteJob(frontend, row, np.empty(0, np.uint8), now).fail(RuntimeError(reason))
        if refused:
            self._flush()
        if jobs and engine is not None:
            engine.batcher.submit(jobs)

    def _explain(self, frontend: Frontend, message: Explain) -> None:
        ring, engine = frontend.ring, self.engines.get(message.generation)
        if ring is None or engine is None or message.slot >= ring.slots:
            explained(
                frontend, Explained(message.token, 503, "the model it was prepared for is no longer served; retry")
            )
            return
        if message.height * message.width * 3 > ring.layout.pixel_bytes:
            self.drop(frontend, f"front-end {frontend.index}: an explanation points outside its ring; disconnected")
            return
        pixels = ring.pixels(message.slot, message.height, message.width).copy()
        self.explanations.ask(ExplainRequest(frontend, message, ring, pixels, engine.model, engine.served.version))

    def _leave(self, frontend: Frontend) -> None:
        frontend.closed = True  # its queued jobs are dropped; its ring goes with the last view of it
        self._selector.unregister(frontend.sock)
        with contextlib.suppress(OSError):  # wakes an inference thread blocked sending to it
            frontend.sock.shutdown(socket.SHUT_RDWR)
        with frontend.lock:  # never closed under a send
            frontend.sock.close()
        del self.frontends[frontend.sock]
        self.board.clear(frontend.index)
        self._free.append(frontend.index)
        self.swapper.switched(frontend)

    def drop(self, frontend: Frontend, reason: str) -> None:
        """Disconnect a front-end, telling it why (it connects again by itself)."""
        logger.warning(reason)
        with contextlib.suppress(OSError):  # never wait on a front-end that does not read
            wire.send(frontend.sock, Dropped(reason), flags=socket.MSG_DONTWAIT)
        self._leave(frontend)

    # --- what a swap asks (api/remote/host/swapper.py) ------------------------------------------------

    def vet(self, requested: str | None) -> Path:
        return vet_checkpoint(requested, self.model.checkpoint_path, self.root)

    def load_beside(self, path: Path, *, deadline: float, cancel: threading.Event) -> Engine:
        """Build the new model in a process of its own first (killed at the deadline or above the
        room), then load it here beside the served one; it must be able to take over."""
        model = dataclasses.replace(self.model, checkpoint_path=path)
        threads = cpu_budget(self.batching.num_threads, workers=self.batching.workers).threads
        prepare_beside(model, self.engine.classifier.device, threads=threads, deadline=deadline, cancel=cancel)
        engine = self._start(model)
        served = self.engine.served
        problem = incompatibility(
            served, engine.served, input_bytes=self._input_bytes(engine), slot_bytes=self.pixel_bytes
        )
        if problem is not None:
            engine.close()
            raise ModelLoadError(problem)
        return engine

    def switch_to(self, engine: Engine) -> tuple[int, set[Frontend]]:
        """The new model is warm: it serves from now on, and every front-end is told to switch."""
        previous = self.generation
        self._serve_model(engine, previous + 1)
        assert self.offer is not None
        switch = Switch(self.offer)
        reached = set()
        for frontend in list(self.frontends.values()):
            try:
                wire.send(frontend.sock, switch)
                reached.add(frontend)
            except OSError:
                pass
        return previous, reached

    def retire(self, generation: int) -> None:
        """What was already queued for the old model finishes on it; then its memory goes."""
        old = self.engines.pop(generation)
        # handed over in a list the thread empties: a thread's own args would hold the model until it ends
        retiring = threading.Thread(target=self._retire, args=([old],), name="model-retire", daemon=True)
        del old
        retiring.start()
        self._retiring = [t for t in self._retiring if t.is_alive()] + [retiring]

    def _retire(self, holder: list[Engine]) -> None:
        _release(holder, "the previous model")
        self.call_soon(self.swapper.retired)

    def discard(self, engine: Engine) -> None:
        threading.Thread(target=_release, args=([engine], "an abandoned load's model"), daemon=True).start()

    def answer(self, frontend: Frontend, answer: Loaded) -> None:
        if not frontend.closed:
            with contextlib.suppress(OSError):
                wire.send(frontend.sock, answer)

    # --- the inference threads, after each batch ----------------------------------------------------

    def _flush(self) -> None:
        self.progress = next(self._batches)
        for frontend in list(self.frontends.values()):
            frontend.flush()


def _release(holder: list[Engine], what: str) -> None:
    """Close a model: what was queued for it finishes first; then its memory goes back."""
    engine = holder.pop()
    version = engine.served.version
    engine.close()
    released = weakref.ref(engine.classifier)
    del engine
    if released() is not None:  # held in a reference cycle: collect it now, not at the next gc pass
        gc.collect()
    release_free_memory()
    outcome = "freed" if released() is None else "still referenced"
    logger.info("%s (version %s) drained and was released (%s)", what, version, outcome)
