"""The in-process ceiling: the service's own engine, without HTTP."""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

from api.config import load_settings
from api.engine.serving.service import Engine
from bench.results import CeilingResult


class Ceiling:
    """The service's own pipeline object (api.engine.serving.service.Engine) called in-process: decode pool,
    batcher, runtime and ranking, everything but HTTP. The best the service could do.

    The machine's speed drifts by several percent over minutes, so the ceiling is not measured once
    and compared with service runs minutes later: after the sweep over concurrency, the best level
    is measured again, 3x longer (the best of a noisy sweep alone is biased upwards), and again after
    every service level (`resample`, while the service is idle), with the batch-1 latency; ratios use
    the medians of those samples.
    """

    def __init__(self, checkpoint: Path, args: argparse.Namespace):
        self.args = args
        settings = load_settings(
            _env_file=None,
            checkpoint_path=checkpoint,
            model_name=args.model,
            num_classes=args.num_classes,
            image_size=args.image_size,
            device=args.device,
            runtime=args.runtime,
            precision=args.precision,
            max_batch_size=args.max_batch_size,  # the service's: the same runtime choice, the same batches
            max_queue=max(args.ceiling_batches) * 2,
            cache_dir=args.cache_dir,
        )
        self.engine = Engine.start(settings.model_group, settings.batching_group)
        self.classifier = self.engine.classifier
        self.pipeline = f"the service's engine in-process, {self.engine.cpu.describe()}"

    def _run(self, data: bytes, concurrency: int, images: int) -> float:
        """`images` classifications, `concurrency` at a time, through the engine: images/s."""

        async def worker(count: int) -> None:
            for _ in range(count):
                await self.engine.classify_all([data], top_k=5)

        async def main() -> None:
            share = max(1, images // concurrency)
            await asyncio.gather(*(worker(share) for _ in range(concurrency)))

        started = time.perf_counter()
        asyncio.run(main())
        return max(1, images // concurrency) * concurrency / (time.perf_counter() - started)

    def _rate(self, data: bytes, concurrency: int, images: int, *, reduced: bool) -> float:
        return self._run(data, concurrency, images)

    def measure(self, data: bytes, *, reduced: bool) -> CeilingResult:
        """Sweep the concurrency, re-measure the best, time the forward pass alone and the batch-1 latency."""
        args = self.args
        sweep = {}
        for level in args.ceiling_batches:
            self._run(data, level, level)  # warm this level
            sweep[level] = self._rate(data, level, max(args.ceiling_images, 2 * level), reduced=reduced)
        level = max(sweep, key=sweep.__getitem__)
        samples = [self._rate(data, level, 3 * args.ceiling_images, reduced=reduced)]
        # the forward pass alone at the largest batch: what the service's inference thread is compared with
        batch = args.max_batch_size
        _, pixels = self.engine.prepare(data)
        rounds = max(1, args.ceiling_images // batch)
        started = time.perf_counter()
        for _ in range(rounds):
            self.classifier.forward([pixels] * batch)
        forward_ms = 1000 * (time.perf_counter() - started) / (rounds * batch)
        latencies = self._latencies_ms(data, reduced=reduced)
        return {
            "images_per_s": samples[0],
            "samples": samples,
            "batch": level,
            "sweep": sweep,
            "forward_ms_per_image": forward_ms,
            "batch1_p50_ms": statistics.median(latencies),
            "batch1_ms": latencies,
            "reduced": reduced,
            "pipeline": self.pipeline,
            "runtime": self.classifier.describe()["runtime"],
            "precision": self.classifier.describe()["precision"],
            "runtime_reason": self.classifier.runtime_reason,
        }

    def _latencies_ms(self, data: bytes, *, reduced: bool) -> list[float]:
        latencies = []
        for _ in range(self.args.latency_samples):
            started = time.perf_counter()
            asyncio.run(self.engine.classify_all([data], top_k=5))
            latencies.append(1000 * (time.perf_counter() - started))
        return latencies

    def resample(self, data: bytes, result: CeilingResult) -> None:
        """One more sample of the best level and of the batch-1 latency; both become medians."""
        result["samples"].append(
            self._rate(data, result["batch"], 3 * self.args.ceiling_images, reduced=result["reduced"])
        )
        result["images_per_s"] = statistics.median(result["samples"])
        result["batch1_ms"] += self._latencies_ms(data, reduced=result["reduced"])
        result["batch1_p50_ms"] = statistics.median(result["batch1_ms"])

    def close(self) -> None:
        self.engine.close()
