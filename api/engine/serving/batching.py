"""Adaptive micro-batching: many requests, one forward pass.

Requests are *admitted* before their images are decoded (a bounded budget: beyond `max_queue`
images the answer is 503 at once), decoded in a thread pool, then queued here. One inference thread
takes the first queued image and collects more until the batch holds `max_batch_size` or
`max_batch_wait_ms` have passed since the first was queued, runs one forward pass, and hands every
caller its row. A batch never waits when no other admitted image is still on its way (nothing is
decoding), so a lone request pays no batching tax. Callers wait at most until their deadline (504);
images whose caller gave up are dropped before the forward pass.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from api.engine.memory import release_free_memory
from api.engine.model.classifier import Classifier
from api.engine.serving.admission import Admission
from api.engine.serving.pipeline import BatchRun, Ticket
from api.errors import GatewayTimeout

logger = logging.getLogger(__name__)

BatchObserver = Callable[[int, float], None]
IDLE_TRIM_S = 1.0
DepthObserver = Callable[[int], None]

Prepared = np.ndarray  # what Classifier.prepare returns for one image: H x W x 3 uint8


class Job(Protocol):
    """One image waiting for the forward pass, and how its answer goes back.

    In this process (`Batcher.predict`) the answer resolves an asyncio future; from a front-end
    process (api/remote/host/host.py) it is written to that front-end's shared-memory slot.
    """

    pixels: Prepared
    queued_at: float  # time.monotonic()

    @property
    def abandoned(self) -> bool:
        """Its caller gave up or its deadline passed: dropped before the forward pass."""
        ...

    def deliver(self, scores: np.ndarray, run: BatchRun) -> None: ...
    def fail(self, error: BaseException) -> None: ...
    def drop(self) -> None: ...


Answer = tuple[np.ndarray, BatchRun]


def _deliver(future: asyncio.Future[Answer], value: Answer) -> None:
    if not future.done():
        future.set_result(value)


def _fail(future: asyncio.Future[Answer], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


@dataclass
class _AsyncJob:
    """A job of this process's event loop: the answer is handed to its future on that loop."""

    pixels: Prepared
    future: asyncio.Future[Answer]
    loop: asyncio.AbstractEventLoop
    queued_at: float = field(default_factory=time.monotonic)
    gave_up: bool = False  # set by the caller's event loop on timeout; read by the inference thread

    @property
    def abandoned(self) -> bool:
        return self.gave_up

    def _hand_over(self, action: Callable[..., None], value: object) -> None:
        # RuntimeError: the caller's event loop is gone (it gave up and shut down): nobody to tell.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(action, self.future, value)

    def deliver(self, scores: np.ndarray, run: BatchRun) -> None:
        self._hand_over(_deliver, (scores, run))

    def fail(self, error: BaseException) -> None:
        self._hand_over(_fail, error)

    def drop(self) -> None:
        pass


def _nothing_on_its_way() -> int:
    return 0


class Batcher:
    """Owns the model's forward passes; safe to call from any number of concurrent requests."""

    def __init__(
        self,
        *,
        max_batch_size: int,
        max_wait_s: float,
        max_queue: int,
        timeout_s: float,
        on_batch: BatchObserver | None = None,
        on_depth: DepthObserver | None = None,
        on_its_way: Callable[[], int] | None = None,
        after_batch: Callable[[], None] | None = None,
    ):
        self.classifier: Classifier | None = None
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.timeout_s = timeout_s
        self.admission = Admission(max_queue, on_depth=on_depth)
        self._on_batch = on_batch
        # images admitted and not queued yet, wherever they are decoded (here, or in front-end processes)
        self._on_its_way: Callable[[], int] = on_its_way or (lambda: self.admission.decoding)
        self._after_batch = after_batch
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    def start(self, load: Callable[[], Classifier]) -> Classifier:
        """Run `load` on the inference thread, then serve batches there; returns once loaded.

        One thread does all of the model's work (loading, warm-up, every forward pass), so torch
        keeps one team of worker threads, sized once, instead of one per calling thread.
        """
        loaded: concurrent.futures.Future[Classifier] = concurrent.futures.Future()

        def run() -> None:
            try:
                self.classifier = load()
            except BaseException as error:  # handed to the caller of start(), which reports it
                loaded.set_exception(error)
                return
            loaded.set_result(self.classifier)
            self._loop(self.classifier)

        self._thread = threading.Thread(target=run, name="inference", daemon=True)
        self._thread.start()
        return loaded.result()

    # --- admission and waiting (event loop side) ---------------------------------------------

    def admit(self, images: int) -> AbstractContextManager[Ticket]:
        """Reserve room for `images` before decoding them, or refuse with 503 (never queue unboundedly)."""
        return self.admission.admit(images)

    async def predict(
        self, ticket: Ticket, images: list[Prepared], *, deadline: float | None = None
    ) -> tuple[np.ndarray, list[BatchRun]]:
        """Scores for admitted, preprocessed images (rows in order) and how each was served."""
        loop = asyncio.get_running_loop()
        items = [_AsyncJob(pixels, loop.create_future(), loop) for pixels in images]
        self.submit(items)
        ticket.queued += len(items)
        self.admission.sent(len(items))
        remaining = (deadline or time.monotonic() + self.timeout_s) - time.monotonic()
        try:
            results = await asyncio.wait_for(asyncio.gather(*(i.future for i in items)), timeout=max(remaining, 0))
        except TimeoutError:
            for item in items:
                item.gave_up = True
            raise GatewayTimeout.unanswered(self.timeout_s) from None
        return np.stack([row for row, _ in results]), [run for _, run in results]

    def submit(self, jobs: Sequence[Job]) -> None:
        """Queue jobs for the inference thread (from any thread)."""
        for job in jobs:
            self._queue.put(job)

    # --- the inference thread --------------------------------------------------------------------

    def _collect(self, first: Job) -> list[Job]:
        batch = [first]
        until = first.queued_at + self.max_wait_s
        while len(batch) < self.max_batch_size:
            try:
                item = self._queue.get_nowait()  # already waiting: always take it
            except queue.Empty:
                left = until - time.monotonic()
                if left <= 0 or self._on_its_way() <= 0:  # nothing else is on its way: don't wait for it
                    break
                try:
                    item = self._queue.get(timeout=left)
                except queue.Empty:
                    break
            if item is None:
                self._queue.put(None)  # the stop signal belongs to the main loop
                break
            batch.append(item)
        return batch

    def _loop(self, classifier: Classifier) -> None:
        busy = False  # batches ran since memory was last handed back
        while True:
            try:
                first = self._queue.get(timeout=IDLE_TRIM_S if busy else None)
            except queue.Empty:  # a quiet second after work: give freed memory back to the OS
                release_free_memory()
                busy = False
                continue
            busy = True
            if first is None:
                return
            self._run(classifier, self._collect(first))

    def _run(self, classifier: Classifier, collected: list[Job]) -> None:
        batch = []
        for job in collected:
            if job.abandoned:
                job.drop()
            else:
                batch.append(job)
        if batch:
            started = time.perf_counter()
            began = time.monotonic()
            try:
                scores = classifier.forward([job.pixels for job in batch]).numpy()
            except Exception as error:  # a failed pass fails its callers, never the thread
                for job in batch:
                    job.fail(error)
            else:
                seconds = time.perf_counter() - started
                if self._on_batch is not None:
                    self._on_batch(len(batch), seconds)
                for row, job in enumerate(batch):
                    job.deliver(scores[row], BatchRun(len(batch), seconds, began - job.queued_at))
        if self._after_batch is not None:
            try:
                self._after_batch()
            except Exception:  # the answers could not be sent: never the end of the inference thread
                logger.exception("handing a batch's answers back failed")

    def close(self) -> None:
        """Finish what is queued, then stop the inference thread."""
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout=60)
        if self._thread is None or not self._thread.is_alive():
            # the callbacks close over their owners: without them no reference cycle holds the model,
            # so it is freed as soon as the last reference goes (a swap's old model, at once)
            self._on_batch = self._after_batch = None
            self._on_its_way = _nothing_on_its_way
