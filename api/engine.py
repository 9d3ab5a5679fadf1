"""Run forward passes off the event loop, one batch at a time, on a dedicated thread.

One thread owns the model: concurrent requests queue for it instead of oversubscribing the CPU
or interleaving CUDA work. (Adaptive micro-batching across requests builds on this.)
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from api.model import Classifier


class InferenceEngine:
    def __init__(self, classifier: Classifier):
        self.classifier = classifier
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")

    async def predict(self, tensors: list[torch.Tensor]) -> tuple[torch.Tensor, float]:
        """Scores for a list of preprocessed images, and the forward pass time in seconds."""
        batch = torch.stack(tensors).contiguous(memory_format=torch.channels_last)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._timed_predict, batch)

    def _timed_predict(self, batch: torch.Tensor) -> tuple[torch.Tensor, float]:
        started = time.perf_counter()
        scores = self.classifier.predict(batch)
        return scores, time.perf_counter() - started

    def close(self) -> None:
        """Finish queued passes, then release the thread."""
        self._executor.shutdown(wait=True)
