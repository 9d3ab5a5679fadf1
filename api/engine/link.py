"""A front-end process's side of the engine process: admit, decode, ship pixels, await answers.

`EngineLink` is a `Pipeline` (api/engine/pipeline.py) like the in-process `Engine`, and imports no
torch: it decodes uploads in its own pool with the recipe the engine sent (api/engine/recipe.py),
writes the pixels into its ring slot, sends one 32-byte record per image and resolves each
request's futures from the engine's replies (read by the event loop, `add_reader`). If the engine
goes away, everything in flight fails at once with 503 `not_ready` and `lost` is set; the
front-end's supervisor (`keep_linked`) then starts or finds the next engine and readiness returns.

`EngineSpawner` starts an engine process for the group when none answers; several front-ends may
try at once: the engine binds its socket before anything else, so the extra ones end at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import functools
import itertools
import json
import logging
import multiprocessing
import os
import pickle
import secrets
import socket
import subprocess
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from api.config import BatchingSettings, ModelSettings
from api.engine import wire
from api.engine.pipeline import (
    BatchRun,
    Classification,
    ImageDescription,
    Served,
    Ticket,
    Upload,
    outcomes_in_order,
    prepare_upload,
)
from api.engine.recipe import Recipe
from api.errors import (
    GatewayTimeout,
    ModelLoadRefused,
    Overloaded,
    RequestError,
    ServiceUnavailable,
    StartupError,
)

logger = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
GROUP_ENV = "API_ENGINE_GROUP"


class InferenceFailed(RequestError):
    status = 500
    code = "inference_failed"


@dataclass(frozen=True)
class EngineConfig:
    """What an engine process is started with (pickled to its stdin)."""

    model: ModelSettings
    batching: BatchingSettings
    linger_s: float
    log_level: str = "INFO"
    log_dir: Path | None = None
    log_format: str = "json"
    # the model swapped in last (None: the configured one); model.checkpoint_path stays the configured one
    swapped_in: Path | None = None


class EngineSpawner:
    """Starts the group's engine process (as this process's child, so it is reaped)."""

    def __init__(self, address: str, config: EngineConfig):
        self.address = address
        self.config = config
        self.process: subprocess.Popen[bytes] | None = None

    def __call__(self) -> None:
        if self.process is not None and self.process.poll() is None:
            return  # ours is still starting
        env = {k: v for k, v in os.environ.items() if k != MULTIPROC_ENV}  # its figures are its own
        self.process = subprocess.Popen(
            [sys.executable, "-m", "api.ops.engine", self.address.lstrip("\0")], stdin=subprocess.PIPE, env=env
        )
        assert self.process.stdin is not None
        self.process.stdin.write(pickle.dumps(self.config))
        self.process.stdin.close()

    def follow(self, checkpoint: str) -> None:
        """The served model was swapped: an engine started from now on (after a crash) loads that one."""
        self.config = dataclasses.replace(self.config, swapped_in=Path(checkpoint))

    def forget(self) -> None:
        """A new attempt: an engine of ours that ended before (killed, say) is reaped and forgotten."""
        if self.process is not None and self.process.poll() is not None:
            self.process = None

    def failed(self) -> int | None:
        """The exit status of the engine we started if it ended with an error before serving (a lost
        race ends with 0; one killed by a signal is started again)."""
        code = self.process.poll() if self.process is not None else None
        return code if code is not None and code > 0 else None

    def wait(self, timeout_s: float) -> None:
        """The engine stops last: wait for ours to end (it does once no front-end is connected)."""
        if self.process is not None:
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.terminate()
                self.process.wait(5)


def engine_group() -> tuple[str, bool]:
    """Which front-ends share an engine, and whether this one shares it.

    Gunicorn's master names its group (API_ENGINE_GROUP, api/gunicorn_conf.py); uvicorn's
    `--workers` and `--reload` start workers as multiprocessing children of one supervisor, whose pid
    names theirs. A lone server process gets an engine of its own, which ends with it."""
    group = os.environ.get(GROUP_ENV)
    if group:
        return group, True
    parent = multiprocessing.parent_process()
    if parent is not None and parent.pid:
        return f"uvicorn-{parent.pid}", True
    return f"{os.getpid()}-{secrets.token_hex(4)}", False


@dataclass(frozen=True)
class ModelView:
    """One model the engine serves, as a front-end needs it: read once per request, so the pixels,
    the labels and the version in an answer all belong to the model that produced its scores."""

    generation: int
    served: Served
    recipe: Recipe
    reduce_to: int | None
    ship_decoded_bytes: int
    described: dict[str, Any]

    @classmethod
    def from_hello(cls, hello: dict[str, Any]) -> ModelView:
        return cls(
            int(hello.get("generation", 0)),
            Served.from_dict(hello["served"]),
            Recipe.from_dict(hello["recipe"]),
            hello["reduce_to"],
            int(hello["ship_decoded_bytes"]),
            hello["describe"],
        )


class EngineLink:
    def __init__(
        self,
        sock: socket.socket,
        hello: dict[str, Any],
        board: wire.Board,
        options: BatchingSettings,
        decode_threads: int,
        observer: Any,
    ):
        self.sock = sock
        self.board = board
        self.index = int(hello["index"])
        self.options = options
        self.view = ModelView.from_hello(hello)
        self.max_queue = int(hello["max_queue"])
        layout = wire.Layout(int(hello["pixel_bytes"]), self.view.served.num_classes)
        slots = min(2 * self.max_queue, 4096)  # abandoned slots stay taken until the engine answers them
        self.ring = wire.Ring.create(slots, layout)
        self._free: deque[int] = deque(range(slots))
        self._pending: dict[int, asyncio.Future[tuple[np.ndarray, BatchRun]]] = {}
        self._metrics: deque[asyncio.Future[bytes]] = deque()
        self._loads: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._unsent: Counter[int] = Counter()  # requests per generation whose jobs are not sent yet
        self._switching: int | None = None  # a generation to confirm once no older job is unsent
        self._ids = itertools.count(1)
        self._decoder = ThreadPoolExecutor(max_workers=decode_threads, thread_name_prefix="decode")
        self._observer = observer
        self.on_switch: Callable[[ModelView], None] = lambda view: None
        self.lost = asyncio.Event()
        self.lost_reason = "the engine process stopped"
        wire.send_json(sock, wire.ATTACH, {"slots": slots}, fds=(self.ring.fd,))
        asyncio.get_running_loop().add_reader(sock, self._on_readable)

    @property
    def served(self) -> Served:
        return self.view.served

    # --- connecting ------------------------------------------------------------------------------

    @classmethod
    async def connect(
        cls, address: str, spawn: EngineSpawner, options: BatchingSettings, decode_threads: int, observer: Any
    ) -> EngineLink:
        """Connect to the group's engine, starting one if none answers; returns once it is loaded."""
        loop = asyncio.get_running_loop()
        spawn.forget()
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                sock.connect(address)
                break
            except (ConnectionRefusedError, FileNotFoundError):
                sock.close()
            code = spawn.failed()
            if code is not None:
                raise StartupError(f"the engine process exited with status {code} before serving (see its log)")
            spawn()
            await asyncio.sleep(0.05)
        try:
            message, fds = await loop.run_in_executor(None, wire.receive, sock)
        except BaseException:
            sock.close()
            raise
        kind, payload = message[:1], message[1:]
        if kind == wire.FAILED_LOAD:
            sock.close()
            raise StartupError(json.loads(payload)["error"])
        if kind != wire.HELLO or not fds:
            sock.close()
            raise ConnectionError("the engine process went away while loading")
        return cls(sock, json.loads(payload), wire.Board(fds[0]), options, decode_threads, observer)

    # --- Pipeline ----------------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        return {**self.view.described, "inference": "process"}

    @contextmanager
    def admit(self, images: int) -> Iterator[Ticket]:
        """Reserve room for `images` over all front-ends, or refuse with 503 (API_MAX_QUEUE)."""
        board, me = self.board, self.index
        with board.lock():
            in_progress = board.in_progress()
            if in_progress + images > self.max_queue:
                raise Overloaded(
                    f"over capacity: {in_progress} images in progress (API_MAX_QUEUE={self.max_queue}); retry",
                    retry_after_s=1,
                )
            board.admitted[me] += images
        board.decoding[me] += images
        ticket = Ticket()
        try:
            yield ticket
        finally:
            if not self.lost.is_set():  # once the link is gone the engine has cleared these counts
                with board.lock():
                    board.admitted[me] -= images
                board.decoding[me] -= images - ticket.queued

    async def classify(
        self, ticket: Ticket, uploads: Sequence[Upload], *, top_k: int, deadline: float | None = None
    ) -> Classification:
        view = self.view  # one model for the whole request, even across a swap
        self._unsent[view.generation] += 1
        try:
            prepared = await asyncio.gather(*(self._prepare(view, data) for data in uploads))
            prepared_at = time.perf_counter()
            if self.lost.is_set():
                for item in prepared:
                    if not isinstance(item, RequestError):
                        self._free.append(item[1])
                raise _engine_gone()
            deadline = deadline or time.monotonic() + self.options.request_timeout_s
            good = [item for item in prepared if not isinstance(item, RequestError)]
            records = np.zeros(len(good), dtype=wire.REQUEST)
            loop = asyncio.get_running_loop()
            futures = []
            for row, (_, slot, height, width, resize) in enumerate(good):
                job = next(self._ids)
                records[row] = (job, slot, height, width, deadline, resize, b"", view.generation)
                self._pending[job] = future = loop.create_future()
                futures.append(future)
            if good:
                for chunk in wire.chunks(records):
                    wire.send(self.sock, wire.JOBS, chunk)
                ticket.queued += len(good)
                self.board.decoding[self.index] -= len(good)
        finally:
            self._unsent[view.generation] -= 1
            self._confirm_switch()
        try:
            answers = await asyncio.wait_for(asyncio.gather(*futures), timeout=max(deadline - time.monotonic(), 0))
        except TimeoutError:
            for _, slot, *_ in good:
                self.ring.state[slot] = wire.ABANDONED  # skipped by the engine; freed once it answers
            raise GatewayTimeout(
                f"no answer within the request deadline (API_REQUEST_TIMEOUT_S={self.options.request_timeout_s:g})"
            ) from None
        infos = [item if isinstance(item, RequestError) else item[0] for item in prepared]
        outcomes = outcomes_in_order(infos, answers, view.served, self._observer, top_k)
        return Classification(outcomes, prepared_at, view.served)

    # --- a model swap (api/engine/host.py does it; every front-end follows) -----------------------

    async def reload(self, checkpoint: str | None) -> dict[str, Any]:
        """Have the engine load `checkpoint` (None: the configured one again) beside the served model
        and switch every front-end to it. Answers once the switch is done, with its figures; raises
        `ModelLoadRefused` (with the status the engine chose: 409 busy, 400 unusable) otherwise."""
        if self.lost.is_set():
            raise _engine_gone()
        token = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._loads[token] = future
        wire.send_json(self.sock, wire.LOAD, {"token": token, "checkpoint": checkpoint})
        try:
            answer = await future
        finally:
            self._loads.pop(token, None)
        if answer["status"] != 200:
            raise ModelLoadRefused(answer["error"], status=int(answer["status"]))
        return answer

    def _switch(self, hello: dict[str, Any]) -> None:
        self.view = ModelView.from_hello(hello)
        self._switching = self.view.generation
        logger.info("switched to model version %s (generation %d)", self.view.served.version, self.view.generation)
        self._confirm_switch()
        self.on_switch(self.view)

    def _confirm_switch(self) -> None:
        """Tell the engine once no job for an older model can still come from here."""
        generation = self._switching
        if generation is None or any(count for gen, count in self._unsent.items() if gen < generation):
            return
        self._switching = None
        with contextlib.suppress(OSError):
            wire.send_json(self.sock, wire.SWITCHED, {"generation": generation})

    def _write(self, view: ModelView, data: Upload, slot: int) -> tuple[ImageDescription, int, int, int, int]:
        info, pixels, needs_resize = prepare_upload(
            data, view.recipe, self.options, reduce_to=view.reduce_to, ship_decoded_bytes=view.ship_decoded_bytes
        )
        height, width = pixels.shape[:2]
        self.ring.pixels(slot, height, width)[...] = pixels
        return info, slot, height, width, int(needs_resize)

    async def _prepare(
        self, view: ModelView, data: Upload
    ) -> tuple[ImageDescription, int, int, int, int] | RequestError:
        if not self._free:
            return Overloaded("over capacity: every slot of this front-end is taken; retry", retry_after_s=1)
        slot = self._free.popleft()
        loop = asyncio.get_running_loop()
        job = functools.partial(contextvars.copy_context().run, self._write, view, data, slot)
        started = time.perf_counter()
        try:
            return await loop.run_in_executor(self._decoder, job)
        except RequestError as error:
            self._free.append(slot)
            return error
        except BaseException:
            self._free.append(slot)
            raise
        finally:
            self._observer.on_stage("decode", time.perf_counter() - started)

    async def engine_metrics(self, timeout_s: float = 2.0) -> bytes:
        """The engine process's own exposition (batch sizes, forward time, queue depth, GPU memory)."""
        if self.lost.is_set():
            return b""
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._metrics.append(future)
        wire.send(self.sock, wire.METRICS)
        try:
            return await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            return b""

    # --- answers (the event loop's reader) ------------------------------------------------------

    def _on_readable(self) -> None:
        while True:
            try:
                message = self.sock.recv(wire.MAX_MESSAGE, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError:
                message = b""
            if not message:
                self._lose()
                return
            kind = message[:1]
            if kind == wire.REPLIES:
                self._answer(np.frombuffer(message, wire.REPLY, offset=1))
            elif kind == wire.METRICS and self._metrics:
                future = self._metrics.popleft()
                if not future.done():
                    future.set_result(message[1:])
            elif kind == wire.SWITCH:
                self._switch(json.loads(message[1:]))
            elif kind == wire.DROPPED_YOU:
                self.lost_reason = str(json.loads(message[1:])["reason"])
            elif kind == wire.LOADED:
                answer = json.loads(message[1:])
                waiter = self._loads.get(int(answer["token"]))
                if waiter is not None and not waiter.done():
                    waiter.set_result(answer)

    def _answer(self, records: np.ndarray) -> None:
        for record in records:
            slot = int(record["slot"])
            future = self._pending.pop(int(record["id"]), None)
            status = int(record["status"])
            if future is not None and not future.done():
                if status == wire.OK:
                    run = BatchRun(int(record["size"]), float(record["forward_s"]), float(record["queued_s"]))
                    future.set_result((self.ring.scores(slot).copy(), run))
                elif status == wire.DROPPED:
                    future.set_exception(GatewayTimeout("the request deadline passed before its forward pass"))
                else:
                    future.set_exception(InferenceFailed("the forward pass failed (see the engine's log)"))
            self.ring.state[slot] = 0
            self._free.append(slot)

    def _lose(self) -> None:
        if self.lost.is_set():
            return
        asyncio.get_running_loop().remove_reader(self.sock)
        self.sock.close()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(_engine_gone())
        self._pending.clear()
        for waiter in self._metrics:
            if not waiter.done():
                waiter.set_result(b"")
        for load in self._loads.values():
            if not load.done():
                load.set_exception(_engine_gone())
        self.lost.set()

    def close(self) -> None:
        """Leave the engine (it ends once no front-end is connected) and stop the decode pool."""
        if not self.lost.is_set():
            with contextlib.suppress(RuntimeError):  # no running loop: closed from a thread
                asyncio.get_running_loop().remove_reader(self.sock)
            self.sock.close()
            self.lost.set()
        self._decoder.shutdown(wait=True)


def _engine_gone() -> ServiceUnavailable:
    return ServiceUnavailable("model not ready: the engine process stopped; it is being restarted", retry_after_s=1)
