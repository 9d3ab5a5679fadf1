"""A front-end process's side of the engine process: admit, decode, ship pixels, await answers.

`EngineLink` is a `Pipeline` (api/engine/serving/pipeline.py) like the in-process `Engine`, and imports no
torch: it decodes uploads in its own pool with the recipe the engine sent (api/engine/images/recipe.py),
writes the pixels into its ring slot, sends one job record per image and resolves each request's
futures from the engine's replies (read by the event loop, `add_reader`).

It lives as long as the front-end; engine processes come and go under it (the supervisor,
api/remote/frontend/supervisor.py, connects it to each). Its ring, its admitted images and every
job not yet answered outlive an engine:
- jobs in flight when the engine dies are sent again to the next one if their deadline allows,
  at most once: a job in flight at two deaths is answered 503 (it may be what kills the engine);
- requests that arrive meanwhile decode as usual and wait for the next engine within their
  deadline (readiness says 503 meanwhile, so a load balancer steers away);
- an engine that says nothing, or finishes no batch while jobs wait, for API_ENGINE_STALL_S is
  reported by `stalled` and killed by the supervisor (`kill_engine`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import itertools
import logging
import os
import socket
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from typing import Any

import msgspec
import numpy as np

from api.config import BatchingSettings
from api.engine.images.decode import OpenedImage, open_image
from api.engine.model.served import Served
from api.engine.serving.admission import Admission
from api.engine.serving.pipeline import (
    BatchRun,
    Classification,
    Explanation,
    ImageDescription,
    StageObserver,
    Ticket,
    Upload,
    decode_budget,
    outcomes_in_order,
    prepare_upload,
)
from api.errors import (
    ExplainBusy,
    GatewayTimeout,
    InferenceFailed,
    ModelLoadBusy,
    ModelLoadRefused,
    Overloaded,
    RequestError,
    ServiceUnavailable,
)
from api.remote import wire
from api.remote.frontend.connection import Connection, ModelView
from api.remote.frontend.inflight import InFlight, PendingJob
from api.remote.frontend.liveness import Liveness
from api.remote.frontend.spawner import kill_engine
from api.remote.messages import (
    DROPPED,
    JOB,
    OK,
    Attach,
    Dropped,
    Explain,
    Explained,
    Heartbeat,
    Hello,
    Load,
    Loaded,
    MalformedMessage,
    Metrics,
    MetricsAsk,
    ModelOffer,
    Replies,
    Switch,
    Switched,
    jobs,
)

logger = logging.getLogger(__name__)

MAX_RING_SLOTS = 4096
# A small JPEG (INLINE_BYTES or less: its header is read on the event loop, bounded) priced at most
# INLINE_WORK (the budget's units: full-scale baseline JPEG pixels; a 451x300 photo is about 0.3 M)
# is decoded on the event loop itself: the hand-off to a decode thread and back costs a front-end
# more CPU than such a decode (measured: 0.4 ms of 2.2 per photo, docs/performance.md). A larger
# or costlier upload, or any other format, goes to the decode pool, so the loop never waits on one.
INLINE_BYTES = 256 * 1024
INLINE_WORK = 500_000
_JPEG_MAGIC = b"\xff\xd8\xff"


def open_small_jpeg(data: Upload, *, reduce_to: int | None, options: BatchingSettings) -> OpenedImage | None:
    """A JPEG of INLINE_BYTES or less, opened and priced (4xx for a bad one); None for anything else.
    The event loop decodes it where its cost is INLINE_WORK or less."""
    if not isinstance(data, bytes) or len(data) > INLINE_BYTES or not data.startswith(_JPEG_MAGIC):
        return None
    return open_image(data, max_pixels=options.max_image_pixels, reduce_to=reduce_to, budget=decode_budget(options))


class EngineLink:
    def __init__(self, options: BatchingSettings, decode_threads: int, observer: StageObserver, *, stall_s: float):
        self.options = options
        self.view: ModelView | None = None
        self.connection: Connection | None = None
        self.ring: wire.Ring | None = None
        self._free: deque[int] = deque()
        self.in_flight = InFlight(release=self._release)
        self.admission = Admission(options.max_queue)
        self._metrics: deque[asyncio.Future[bytes]] = deque()
        self._loads: dict[int, asyncio.Future[Loaded]] = {}
        # explanations awaited: each holds its slot until the engine answers (it writes the heatmap there)
        self._explains: dict[int, tuple[asyncio.Future[tuple[Explained, np.ndarray]], PendingJob]] = {}
        self._unsent: Counter[tuple[int, int]] = Counter()  # requests per (epoch, generation) not sent yet
        self._switching: int | None = None  # a generation to confirm once no older job is unsent
        self._ids = itertools.count(1)
        self._epochs = itertools.count(1)
        self._decoder = ThreadPoolExecutor(max_workers=decode_threads, thread_name_prefix="decode")
        self._observer = observer
        self.liveness = Liveness(stall_s)
        self._closed = False
        self.on_switch: list[Callable[[ModelView], None]] = []
        self.linked = asyncio.Event()  # connected to an engine that serves
        self.lost = asyncio.Event()  # the connection ended (the supervisor waits for this)
        self.lost_reason = "the engine process stopped"

    @property
    def served(self) -> Served:
        assert self.view is not None, "no engine has been connected yet"
        return self.view.served

    # --- engines coming and going (the supervisor) --------------------------------------------------

    def attach(self, sock: socket.socket, hello: Hello, board: wire.Board) -> None:
        """Serve through a newly connected engine: hand it the ring, mirror our admitted images on its
        board, and send it the jobs the last one left unanswered."""
        view = ModelView.offered(next(self._epochs), hello.model)
        previous = self.view
        classes = view.served.num_classes
        ring = self.ring
        if ring is None or ring.layout.pixel_bytes < hello.pixel_bytes or ring.layout.classes != classes:
            self.in_flight.give_up("the restarted engine serves a model of another shape")
            slots = min(2 * hello.max_queue, MAX_RING_SLOTS)  # abandoned slots stay taken until answered
            ring = self.ring = wire.Ring.create(slots, wire.Layout(hello.pixel_bytes, classes))
            self._free = deque(range(slots))
        elif previous is not None and not view.prepares_like(previous):
            self.in_flight.give_up("the restarted engine serves another model")
        self.view = view
        self.connection = connection = Connection(sock, board, hello.index, wire.peer_pid(sock))
        self._switching = None
        wire.send(sock, Attach(ring.slots, ring.layout.pixel_bytes, classes), fds=(ring.fd,))
        self.admission.attach(board, hello.index, hello.max_queue)
        self.liveness.connected(time.monotonic())
        self.lost.clear()
        asyncio.get_running_loop().add_reader(sock, self._on_readable, connection)
        replay = self.in_flight.take_replay()
        if replay:
            logger.warning("sending %d images again: they were in flight when the last engine ended", len(replay))
            self._send(replay, view)
        self.linked.set()

    def stalled(self, now: float) -> str | None:
        """Why the connected engine counts as stalled (None: it does not): it said nothing for
        API_ENGINE_STALL_S, or finished no batch for that long while our jobs waited."""
        if self.connection is None:
            return None
        return self.liveness.stalled(now, len(self.in_flight))

    def kill_engine(self, reason: str) -> None:
        """Kill the connected engine process (it stalled) and let go of it; the jobs it held are sent
        again to the next one."""
        connection = self.connection
        if connection is None:
            return
        kill_engine(connection.pid)
        self._lose(f"{reason}: killed it (pid {connection.pid})")

    def close(self) -> None:
        """Leave the engine (it ends once no front-end is connected) and stop the decode pool; what
        still waits for an engine is answered 503."""
        self._closed = True
        self._lose("the service is shutting down")
        self.in_flight.give_up("the service is shutting down")
        self.linked.set()  # wakes requests waiting for an engine: they find none and answer 503
        self._decoder.shutdown(wait=True)

    # --- Pipeline ----------------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        assert self.view is not None, "no engine has been connected yet"
        return {**self.view.described, "inference": "process"}

    def admit(self, images: int) -> AbstractContextManager[Ticket]:
        """Reserve room for `images` over all front-ends, or refuse with 503 (API_MAX_QUEUE). With no
        engine connected (it is restarting), over this front-end's own images."""
        return self.admission.admit(images)

    async def classify(
        self, ticket: Ticket, uploads: Sequence[Upload], *, top_k: int, deadline: float | None = None
    ) -> Classification:
        view = self.view  # one model for the whole request, even across a swap
        assert view is not None, "no engine has been connected yet"
        deadline = deadline or time.monotonic() + self.options.request_timeout_s
        key = (view.epoch, view.generation)
        self._unsent[key] += 1
        try:
            # one upload (the common request) is prepared in this task: a task of its own and a gather
            # would cost the event loop an iteration and three objects per request
            if len(uploads) == 1:
                prepared = [await self._prepare(view, uploads[0], deadline)]
            else:
                prepared = list(await asyncio.gather(*(self._prepare(view, data, deadline) for data in uploads)))
            prepared_at = time.perf_counter()
            good = [item for item in prepared if not isinstance(item, RequestError)]
            pending = [job for _, job in good]
            if pending:
                try:
                    await self._engine_within(deadline, view)
                except RequestError:
                    for job in pending:
                        self._release(job)
                    raise
                self._send(pending, view)
                ticket.queued += len(pending)
                self.admission.sent(len(pending))
        finally:
            self._unsent[key] -= 1
            if not self._unsent[key]:
                del self._unsent[key]
            self._confirm_switch()
        try:
            left = max(deadline - time.monotonic(), 0)
            if len(pending) == 1:  # the common request: its future awaited as it is, no gather
                answers = [await asyncio.wait_for(pending[0].future, timeout=left)]
            else:
                answers = await asyncio.wait_for(asyncio.gather(*(job.future for job in pending)), timeout=left)
        except TimeoutError:
            self.in_flight.abandon(pending, self.ring)
            raise GatewayTimeout.unanswered(self.options.request_timeout_s) from None
        infos = [item if isinstance(item, RequestError) else item[0] for item in prepared]
        served = answers[-1][2] if answers else view.served
        outcomes = outcomes_in_order(infos, [(s, run) for s, run, _ in answers], served, self._observer, top_k)
        return Classification(outcomes, prepared_at, served)

    async def explain(self, upload: Upload, label: int, *, deadline: float) -> Explanation:
        """A Grad-CAM heatmap of `label` for `upload`, from the engine's explaining process
        (api/remote/host/explainer.py): 503 ExplainBusy beyond API_MAX_EXPLANATIONS, 504 past `deadline`."""
        view = self.view
        assert view is not None, "no engine has been connected yet"
        prepared = await self._prepare(view, upload, deadline)
        if isinstance(prepared, RequestError):
            raise prepared
        info, job = prepared
        try:
            await self._engine_within(deadline, view)
        except RequestError:
            self._release(job)
            raise
        connection = self.connection
        assert connection is not None
        token = next(self._ids)
        future: asyncio.Future[tuple[Explained, np.ndarray]] = asyncio.get_running_loop().create_future()
        self._explains[token] = (future, job)
        try:
            wire.send(
                connection.sock, Explain(token, view.generation, job.slot, job.height, job.width, job.resize, label)
            )
        except OSError:
            self._lose(self.lost_reason)
        try:
            answer, heatmap = await asyncio.wait_for(asyncio.shield(future), max(deadline - time.monotonic(), 0))
        except TimeoutError:  # its slot stays taken until the engine answers
            future.add_done_callback(lambda done: done.cancelled() or done.exception())  # retrieved: no warning
            raise GatewayTimeout.unanswered(self.options.request_timeout_s) from None
        if answer.status == 503:
            raise ExplainBusy(answer.error or "busy", retry_after_s=1)
        if answer.status != 200:
            raise InferenceFailed(answer.error or "the explanation failed (see the engine's log)")
        box = view.recipe.source_box(info.width, info.height)
        return Explanation(heatmap, box, answer.layer, answer.seconds, answer.memory_mb)

    def _explained(self, answer: Explained) -> None:
        entry = self._explains.pop(answer.token, None)
        if entry is None:
            return
        future, job = entry
        heatmap = job.ring.heatmap(job.slot, answer.height, answer.width).copy() if answer.status == 200 else None
        self._release(job)
        if not future.done():
            future.set_result((answer, heatmap if heatmap is not None else np.zeros((0, 0), np.uint8)))

    async def _engine_within(self, deadline: float, view: ModelView) -> None:
        """An engine to send to, waiting for one (restarting) until `deadline`; 503 when none came, or
        when the one that came serves a model the pixels were not prepared for."""
        if not self.linked.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.linked.wait(), timeout=max(deadline - time.monotonic(), 0))
        if self.connection is None or self._closed:
            raise ServiceUnavailable(
                "model not ready: the engine process is restarting and was not back within the request "
                f"deadline (API_REQUEST_TIMEOUT_S={self.options.request_timeout_s:g})",
                retry_after_s=1,
            )
        current = self.view
        if current is not None and current.epoch != view.epoch and not current.prepares_like(view):
            raise ServiceUnavailable("the restarted engine process serves another model; retry", retry_after_s=1)

    def _send(self, pending: list[PendingJob], prepared_for: ModelView) -> None:
        """Send jobs whose pixels were prepared for `prepared_for`: to that model while its engine
        lives (a swap keeps it until every front-end confirmed), else to what the engine now serves."""
        connection, current = self.connection, self.view
        assert connection is not None and current is not None
        view = prepared_for if prepared_for.epoch == current.epoch else current
        if not self.in_flight:
            self.liveness.advanced(time.monotonic())  # the wait for a batch starts now
        records = np.zeros(len(pending), dtype=JOB)
        for row, job in enumerate(pending):
            records[row] = (job.id, job.slot, job.height, job.width, job.deadline, job.resize, b"")
            job.served = view.served
        self.in_flight.sent(pending)
        try:
            for message in jobs(view.generation, records):
                wire.send(connection.sock, message)
        except OSError:  # the engine is gone: these are in flight at its end like the rest
            self._lose(self.lost_reason)

    # --- a model swap (api/remote/host/swapper.py does it; every front-end follows) -----------------

    async def reload(self, checkpoint: str | None) -> dict[str, Any]:
        """Have the engine load `checkpoint` (None: the configured one again) beside the served model
        and switch every front-end to it. Answers once the switch is done, with its figures; raises
        `ModelLoadRefused` (with the status the engine chose: 409 busy, 400 unusable) otherwise."""
        connection = self.connection
        if connection is None:
            raise _engine_gone()
        token = next(self._ids)
        future: asyncio.Future[Loaded] = asyncio.get_running_loop().create_future()
        self._loads[token] = future
        wire.send(connection.sock, Load(token, checkpoint))
        try:
            answer = await future
        finally:
            self._loads.pop(token, None)
        if answer.status != 200 or answer.figures is None:
            raise (ModelLoadBusy if answer.status == 409 else ModelLoadRefused)(answer.error or "refused")
        return msgspec.structs.asdict(answer.figures)

    def _switch(self, offer: ModelOffer) -> None:
        assert self.view is not None
        self.view = ModelView.offered(self.view.epoch, offer)
        self._switching = offer.generation
        logger.info("switched to model version %s (generation %d)", offer.served.version, offer.generation)
        self._confirm_switch()
        for listener in self.on_switch:
            listener(self.view)

    def _confirm_switch(self) -> None:
        """Tell the engine once no job for an older model can still come from here."""
        generation, connection, view = self._switching, self.connection, self.view
        if generation is None or connection is None or view is None:
            return
        if any(epoch == view.epoch and older < generation for epoch, older in self._unsent):
            return
        self._switching = None
        with contextlib.suppress(OSError):
            wire.send(connection.sock, Switched(generation))

    # --- decoding ------------------------------------------------------------------------------------

    def _open_small_jpeg(self, view: ModelView, data: Upload) -> OpenedImage | None:
        """A small JPEG opened and priced here (4xx for a bad one); None for anything else."""
        return open_small_jpeg(data, reduce_to=view.reduce_to, options=self.options)

    def _write(
        self, view: ModelView, data: Upload | OpenedImage, ring: wire.Ring, slot: int
    ) -> tuple[ImageDescription, int, int, int]:
        info, pixels, needs_resize = prepare_upload(
            data, view.recipe, self.options, reduce_to=view.reduce_to, ship_decoded_bytes=view.ship_decoded_bytes
        )
        height, width = pixels.shape[:2]
        ring.pixels(slot, height, width)[...] = pixels
        return info, height, width, int(needs_resize)

    async def _prepare(
        self, view: ModelView, data: Upload, deadline: float
    ) -> tuple[ImageDescription, PendingJob] | RequestError:
        ring = self.ring
        if ring is None or not self._free:
            return Overloaded("over capacity: every slot of this front-end is taken; retry", retry_after_s=1)
        # the slot freed last: its pages are warm, and a ring touches no more slots than are ever in flight
        slot = self._free.pop()
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            opened = self._open_small_jpeg(view, data)
            if opened is not None and opened.cost.work <= INLINE_WORK:  # cheap: decoded here, on the event loop
                info, height, width, resize = self._write(view, opened, ring, slot)
            else:
                upload = data if opened is None else opened
                job = functools.partial(contextvars.copy_context().run, self._write, view, upload, ring, slot)
                info, height, width, resize = await loop.run_in_executor(self._decoder, job)
        except RequestError as error:
            self._free_slot(ring, slot)
            return error
        except BaseException:
            self._free_slot(ring, slot)
            raise
        finally:
            self._observer.on_stage("decode", time.perf_counter() - started)
        return info, PendingJob(next(self._ids), slot, height, width, resize, deadline, ring, loop.create_future())

    def _free_slot(self, ring: wire.Ring, slot: int) -> None:
        if ring is self.ring:  # a slot of a ring given up (another model's shape) is gone with it
            ring.state[slot] = 0
            self._free.append(slot)

    def _release(self, job: PendingJob) -> None:
        self._free_slot(job.ring, job.slot)

    async def engine_metrics(self, timeout_s: float = 2.0) -> bytes:
        """The engine process's own exposition (batch sizes, forward time, queue depth, GPU memory)."""
        connection = self.connection
        if connection is None:
            return b""
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._metrics.append(future)
        wire.send(connection.sock, MetricsAsk())
        try:
            return await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            return b""

    # --- the engine's messages (the event loop's reader) ---------------------------------------------

    def _on_readable(self, connection: Connection) -> None:
        while connection is self.connection:
            try:
                message, fds = wire.receive(connection.sock, wait=False)
            except BlockingIOError:
                return
            except MalformedMessage as error:
                self.kill_engine(f"the engine process sent {error}")
                return
            except OSError:
                message, fds = None, []
            for fd in fds:
                os.close(fd)
            if message is None:
                self._lose(self.lost_reason)
                return
            now = time.monotonic()
            self.liveness.heard(now)
            if isinstance(message, Replies):
                self.liveness.advanced(now)
                self._answer(message.rows())
            elif isinstance(message, Heartbeat):
                self.liveness.beat(message.progress, now)
            elif isinstance(message, Metrics) and self._metrics:
                waiter = self._metrics.popleft()
                if not waiter.done():
                    waiter.set_result(message.text)
            elif isinstance(message, Switch):
                self._switch(message.model)
            elif isinstance(message, Dropped):
                self.lost_reason = message.reason
            elif isinstance(message, Loaded):
                load = self._loads.get(message.token)
                if load is not None and not load.done():
                    load.set_result(message)
            elif isinstance(message, Explained):
                self._explained(message)

    def _answer(self, records: np.ndarray) -> None:
        for record in records:
            job = self.in_flight.answered(int(record["id"]))
            if job is None:
                continue
            status = int(record["status"])
            if not job.future.done():
                if status == OK:
                    run = BatchRun(int(record["size"]), float(record["forward_s"]), float(record["queued_s"]))
                    assert job.served is not None  # set when sent
                    job.future.set_result((job.ring.scores(job.slot)[: job.served.width].copy(), run, job.served))
                elif status == DROPPED:
                    job.future.set_exception(GatewayTimeout("the request deadline passed before its forward pass"))
                else:
                    job.future.set_exception(InferenceFailed("the forward pass failed (see the engine's log)"))
            self._release(job)

    def _lose(self, reason: str) -> None:
        """The engine is gone: what it held in flight is kept for the next one (once), and what waited
        on it answers."""
        connection = self.connection
        if connection is None:
            return
        self.connection = None
        self.admission.detach()
        self.linked.clear()
        with contextlib.suppress(RuntimeError):  # no running loop: closed from a thread
            asyncio.get_running_loop().remove_reader(connection.sock)
        connection.sock.close()
        self.in_flight.engine_ended()
        for waiter in self._metrics:
            if not waiter.done():
                waiter.set_result(b"")
        self._metrics.clear()
        for load in self._loads.values():
            if not load.done():
                load.set_exception(_engine_gone())
        for future, job in self._explains.values():  # the engine will write no heatmap now
            self._release(job)
            if not future.done():
                future.set_exception(_engine_gone())
        self._explains.clear()
        self.lost_reason = reason
        self.lost.set()


def _engine_gone() -> ServiceUnavailable:
    return ServiceUnavailable("model not ready: the engine process stopped; it is being restarted", retry_after_s=1)
