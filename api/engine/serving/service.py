"""The serving object: one pipeline from uploaded bytes to ranked labels.

    admit (bounded: 503 beyond API_MAX_QUEUE) -> decode + resize/crop in the decode pool
      -> the batcher (one inference thread, batches by size or deadline) -> the runtime -> rank

`Engine` owns the decode pool, the batcher, the classifier and ranking, and answers "classify these
uploads" item by item: a result or an error each, so one bad file never fails the others. The HTTP
routes, `cat-breeds-api predict` (local mode) and the bench's in-process ceiling all call it: there
is one truth about how an image is classified.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from typing import Any, Protocol

import numpy as np
import torch

from api.config import BatchingSettings, ModelSettings
from api.cpu import CpuBudget, cpu_budget
from api.engine.memory import cap_arenas, keep_freed_memory, release_free_memory
from api.engine.model.classifier import Classifier
from api.engine.model.loader import load_classifier
from api.engine.serving.batching import Batcher
from api.engine.serving.pipeline import (
    BatchRun,
    Classification,
    Explanation,
    ImageDescription,
    Ticket,
    Upload,
    decode_budget,
    outcomes_in_order,
    prepare_upload,
)
from api.errors import ExplainBusy, RequestError

logger = logging.getLogger(__name__)


class Observer(Protocol):
    """Where the engine reports its figures (the HTTP side's Prometheus metrics)."""

    def on_batch(self, size: int, seconds: float, gpu_bytes: int | None) -> None: ...
    def on_depth(self, depth: int) -> None: ...
    def on_stage(self, stage: str, seconds: float) -> None: ...


class _Quiet:
    def on_batch(self, size: int, seconds: float, gpu_bytes: int | None) -> None:
        pass

    def on_depth(self, depth: int) -> None:
        pass

    def on_stage(self, stage: str, seconds: float) -> None:
        pass


class Engine:
    """The classifier, its batcher and the decode pool, started together and closed together."""

    def __init__(
        self,
        classifier: Classifier,
        batcher: Batcher,
        decoder: ThreadPoolExecutor,
        options: BatchingSettings,
        cpu: CpuBudget,
        observer: Observer,
        model: ModelSettings,
    ):
        self.classifier = classifier
        self.model = model  # what it was loaded from (an explanation loads the same folds again)
        self.batcher = batcher
        self.options = options
        self.cpu = cpu
        self._decoder = decoder
        self._observer = observer
        self._reduce_to = classifier.resize_short_side if options.reduced_decode else None
        self._ship_bytes = classifier.ship_decoded_bytes(options.preprocess)
        self._explaining = threading.Lock()
        self._explainer: Any = None  # api.engine.model.explain.GradCam, loaded on the first explanation
        self.served = classifier.served

    @classmethod
    def start(
        cls,
        model: ModelSettings,
        batching: BatchingSettings,
        observer: Observer | None = None,
        *,
        on_its_way: Callable[[], int] | None = None,
        after_batch: Callable[[], None] | None = None,
        measure: bool = True,
    ) -> Engine:
        """Load the classifier on the inference thread (threads sized from the CPU quota), start its
        batcher and the decode pool. Blocks until loaded and warmed up.

        The engine process (api/remote/host/host.py) passes `on_its_way` (images front-ends are still
        decoding) and `after_batch` (send the batch's replies) and submits jobs itself, and `measure=False`
        (MeasurementNeeded: its prepare process measures the CPU's runtimes, api/engine/model/choice.py)."""
        watcher = observer or _Quiet()
        budget = cpu_budget(batching.num_threads, workers=batching.workers)
        logger.info("cpu: %s; inference threads %d, decode pool %d", budget.describe(), budget.threads, budget.threads)
        logger.info(keep_freed_memory(batching.heap_keep_mb))
        logger.info(cap_arenas())

        def load() -> Classifier:
            torch.set_num_threads(budget.threads)
            return load_classifier(model, threads=budget.threads, measure=measure)

        def on_batch(size: int, seconds: float) -> None:
            device = batcher.classifier.device if batcher.classifier is not None else None
            gpu = torch.cuda.memory_allocated(device) if device is not None and device.type == "cuda" else None
            watcher.on_batch(size, seconds, gpu)

        batcher = Batcher(
            max_batch_size=batching.max_batch_size,
            max_wait_s=batching.max_batch_wait_s,
            max_queue=batching.max_queue,
            timeout_s=batching.request_timeout_s,
            on_batch=on_batch,
            on_depth=watcher.on_depth,
            on_its_way=on_its_way,
            after_batch=after_batch,
        )
        classifier = batcher.start(load)
        release_free_memory()  # what conversion, timing and warm-up freed goes back to the OS now
        decoder = ThreadPoolExecutor(max_workers=budget.threads, thread_name_prefix="decode")
        return cls(classifier, batcher, decoder, batching, budget, watcher, model)

    # --- the pipeline ----------------------------------------------------------------------------

    def admit(self, images: int) -> AbstractContextManager[Ticket]:
        """Reserve room for `images` before reading or decoding them, or 503 (Overloaded)."""
        return self.batcher.admit(images)

    def prepare(self, data: Upload) -> tuple[ImageDescription, np.ndarray]:
        """Decode + the per-image half of preprocessing (in the decode pool), resized where an engine
        process resizes it (`Classifier.ship_decoded_bytes`), so a file scores the same here as served:
        on a CPU here, on a GPU with its batch."""
        classifier = self.classifier
        info, pixels, resize = prepare_upload(
            data, classifier.split, self.options, reduce_to=self._reduce_to, ship_decoded_bytes=self._ship_bytes
        )
        if resize and classifier.device.type == "cpu":
            pixels = classifier.resize_crop(pixels)
        return info, pixels

    async def _prepare(self, data: Upload) -> tuple[ImageDescription, np.ndarray] | RequestError:
        loop = asyncio.get_running_loop()
        # in the caller's context: its request id on any record the decoder writes
        job = functools.partial(contextvars.copy_context().run, self.prepare, data)
        started = time.perf_counter()
        try:
            return await loop.run_in_executor(self._decoder, job)
        except RequestError as error:
            return error
        finally:
            self._observer.on_stage("decode", time.perf_counter() - started)

    async def classify(
        self, ticket: Ticket, uploads: Sequence[Upload], *, top_k: int, deadline: float | None = None
    ) -> Classification:
        """Admitted uploads -> one outcome each, in order. Decoded concurrently, then classified
        together; a file that fails to decode gets its error, the others their labels. A passed
        deadline (504) concerns them all and is raised."""
        prepared = await asyncio.gather(*(self._prepare(data) for data in uploads))
        prepared_at = time.perf_counter()
        good = [item[1] for item in prepared if not isinstance(item, RequestError)]
        answers: list[tuple[np.ndarray, BatchRun]] = []
        if good:
            scores, runs = await self.batcher.predict(ticket, good, deadline=deadline)
            answers = list(zip(scores, runs, strict=True))
        infos = [item if isinstance(item, RequestError) else item[0] for item in prepared]
        return Classification(
            outcomes_in_order(infos, answers, self.served, self._observer, top_k), prepared_at, self.served
        )

    async def classify_all(
        self, uploads: Sequence[Upload], *, top_k: int, deadline: float | None = None
    ) -> Classification:
        """Admit and classify (the CLI's local mode, the bench's ceiling)."""
        with self.admit(len(uploads)) as ticket:
            return await self.classify(ticket, uploads, top_k=top_k, deadline=deadline)

    async def explain(self, upload: Upload, label: int, *, deadline: float) -> Explanation:
        """Grad-CAM of `label`, in this process (the CLI's local mode): the folds loaded as PyTorch
        modules on first use, one explanation at a time (ExplainBusy beyond)."""
        if not self._explaining.acquire(blocking=False):
            raise ExplainBusy("an explanation is in progress; retry", retry_after_s=1)
        try:
            prepared = await self._prepare(upload)
            if isinstance(prepared, RequestError):
                raise prepared
            info, pixels = prepared

            def run() -> Explanation:
                from api.engine.model.explain import load_explainer

                if self._explainer is None:
                    self._explainer = load_explainer(self.model)
                heatmap = self._explainer.explain(pixels, label)
                box = self.classifier.split.source_box(info.width, info.height)
                return Explanation(heatmap.gray(), box, heatmap.layer, heatmap.seconds, _resident_mb())

            return await asyncio.wait_for(asyncio.to_thread(run), max(deadline - time.monotonic(), 0))
        finally:
            self._explaining.release()

    # --- what it is --------------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """The classifier's description plus the limits it serves under (the ready line, /api/v1/model)."""
        options = self.options
        return {
            **self.classifier.describe(),
            "cpu": self.cpu.describe(),
            "max_batch_size": options.max_batch_size,
            "max_batch_wait_ms": options.max_batch_wait_s * 1000,
            "max_queue": options.max_queue,
            "request_timeout_s": options.request_timeout_s,
            "max_image_pixels": options.max_image_pixels,
            "decode_budget_mb": round(decode_budget(options).allowance.memory_mb),
            "reduced_decode": options.reduced_decode,
        }

    def close(self) -> None:
        """Finish what is queued, then stop the inference thread and the decode pool."""
        self.batcher.close()
        self._decoder.shutdown(wait=True)


def _resident_mb() -> float:
    """This process's resident memory, in MiB."""
    with open("/proc/self/statm") as statm:
        return round(int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1 << 20), 1)
