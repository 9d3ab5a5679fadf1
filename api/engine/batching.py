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
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from api.engine.classifier import Classifier
from api.engine.memory import release_free_memory
from api.errors import GatewayTimeout, Overloaded

BatchObserver = Callable[[int, float], None]
IDLE_TRIM_S = 1.0
DepthObserver = Callable[[int], None]


@dataclass(frozen=True)
class BatchRun:
    """How one image was served: the size of its batch, that forward pass, its wait in the queue."""

    size: int
    forward_s: float
    queued_s: float


@dataclass
class Ticket:
    """Room reserved for admitted images; `queued` of them have reached the queue."""

    queued: int = 0


Prepared = np.ndarray  # what Classifier.prepare returns for one image: H x W x 3 uint8


@dataclass
class _Item:
    pixels: Prepared
    future: asyncio.Future[tuple[torch.Tensor, BatchRun]]
    loop: asyncio.AbstractEventLoop
    queued_at: float = field(default_factory=time.monotonic)
    abandoned: bool = False  # set by the caller's event loop on timeout; read by the inference thread


def _deliver(future: asyncio.Future[tuple[torch.Tensor, BatchRun]], value: tuple[torch.Tensor, BatchRun]) -> None:
    if not future.done():
        future.set_result(value)


def _fail(future: asyncio.Future[tuple[torch.Tensor, BatchRun]], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


def _hand_over(item: _Item, action: Callable[..., None], value: object) -> None:
    # RuntimeError: the caller's event loop is gone (it gave up and shut down): nobody to tell.
    with contextlib.suppress(RuntimeError):
        item.loop.call_soon_threadsafe(action, item.future, value)


class Batcher:
    """Owns the model's forward passes; safe to call from any number of concurrent requests."""

    def __init__(
        self,
        *,
        max_batch_size: int = 16,
        max_wait_s: float = 0.005,
        max_queue: int = 64,
        timeout_s: float = 30.0,
        on_batch: BatchObserver | None = None,
        on_depth: DepthObserver | None = None,
    ):
        self.classifier: Classifier | None = None
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        self._on_batch = on_batch
        self._on_depth = on_depth
        self._queue: queue.Queue[_Item | None] = queue.Queue()
        self._admitted = 0  # images admitted and not yet answered (decoding, queued or running)
        self._decoding = 0  # of those, images not yet queued: "more is on its way"
        self._lock = threading.Lock()
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

    # --- admission (event loop side) -------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Images admitted and not yet answered: what the queue-depth gauge reports."""
        return self._admitted

    @contextmanager
    def admit(self, images: int = 1) -> Iterator[Ticket]:
        """Reserve room for `images` before decoding them, or refuse with 503 (never queue unboundedly)."""
        with self._lock:
            if self._admitted + images > self.max_queue:
                raise Overloaded(
                    f"over capacity: {self._admitted} images in progress (API_MAX_QUEUE={self.max_queue}); retry",
                    retry_after_s=1,
                )
            self._admitted += images
            self._decoding += images
            depth = self._admitted
        self._report_depth(depth)
        ticket = Ticket()
        try:
            yield ticket
        finally:
            with self._lock:
                self._admitted -= images
                self._decoding -= images - ticket.queued  # images that failed to decode never came
                depth = self._admitted
            self._report_depth(depth)

    def _report_depth(self, depth: int) -> None:
        if self._on_depth is not None:
            self._on_depth(depth)

    async def predict(
        self, ticket: Ticket, images: list[Prepared], *, deadline: float | None = None
    ) -> tuple[torch.Tensor, list[BatchRun]]:
        """Scores for admitted, preprocessed images (rows in order) and how each was served."""
        loop = asyncio.get_running_loop()
        items = [_Item(pixels, loop.create_future(), loop) for pixels in images]
        with self._lock:
            for item in items:
                self._queue.put(item)
            ticket.queued += len(items)
            self._decoding -= len(items)
        remaining = (deadline or time.monotonic() + self.timeout_s) - time.monotonic()
        try:
            results = await asyncio.wait_for(asyncio.gather(*(i.future for i in items)), timeout=max(remaining, 0))
        except TimeoutError:
            for item in items:
                item.abandoned = True
            raise GatewayTimeout(
                f"no answer within the request deadline (API_REQUEST_TIMEOUT_S={self.timeout_s:g})"
            ) from None
        return torch.stack([row for row, _ in results]), [run for _, run in results]

    # --- the inference thread --------------------------------------------------------------------

    def _collect(self, first: _Item) -> list[_Item]:
        batch = [first]
        until = first.queued_at + self.max_wait_s
        while len(batch) < self.max_batch_size:
            try:
                item = self._queue.get_nowait()  # already waiting: always take it
            except queue.Empty:
                left = until - time.monotonic()
                if left <= 0 or self._decoding <= 0:  # nothing else is on its way: don't wait for it
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
            batch = [item for item in self._collect(first) if not item.abandoned]
            if not batch:
                continue
            started = time.perf_counter()
            began = time.monotonic()
            try:
                scores = classifier.forward([item.pixels for item in batch])
            except Exception as error:  # a failed pass fails its callers, never the thread
                for item in batch:
                    _hand_over(item, _fail, error)
                continue
            seconds = time.perf_counter() - started
            if self._on_batch is not None:
                self._on_batch(len(batch), seconds)
            for row, item in enumerate(batch):
                _hand_over(item, _deliver, (scores[row], BatchRun(len(batch), seconds, began - item.queued_at)))

    def close(self) -> None:
        """Finish what is queued, then stop the inference thread."""
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout=60)
