"""The engine's own figures (Prometheus): batch sizes, forward time, queue depth, GPU memory.

In one process they join the HTTP metrics' registry (api/http/metrics.py); in the engine process
(api/remote/host/host.py) they are that process's registry, and every front-end's `/metrics` appends
them once to its scrape.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge, Histogram

from api.engine.model.served import Served

PREFIX = "cat_breeds_api"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class EngineFigures:
    """The engine's observer (api.engine.serving.service.Observer, minus the per-image stages)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.inference = Histogram(
            f"{PREFIX}_inference_duration_seconds",
            "Forward pass time per batch.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            f"{PREFIX}_inference_batch_size",
            "Images per forward pass.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=registry,
        )
        self.queue_depth = Gauge(
            f"{PREFIX}_queue_depth",
            "Images admitted and not yet answered (decoding, queued or in a forward pass).",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.gpu_memory = Gauge(
            f"{PREFIX}_gpu_memory_allocated_bytes",
            "CUDA memory held by tensors after the latest forward pass (CUDA devices only).",
            registry=registry,
            multiprocess_mode="livesum",
        )

        self.model = Gauge(
            f"{PREFIX}_model_info",
            "The model serving predictions: 1 for its version (the checkpoint's short sha256), architecture, "
            "runtime and the precision it computes in, and how many folds answer as one model.",
            ["version", "architecture", "checkpoint_sha256", "runtime", "precision", "folds"],
            registry=registry,
            multiprocess_mode="livemax",
        )

    def on_model(self, served: Served) -> None:
        """A model started serving (at start, and after each swap): the info metric names it alone."""
        self.model.clear()
        self.model.labels(
            served.version,
            served.architecture,
            served.checkpoint_sha256,
            served.runtime,
            served.precision,
            str(served.folds),
        ).set(1)

    def on_batch(self, size: int, seconds: float, gpu_bytes: int | None) -> None:
        self.batch_size.observe(size)
        self.inference.observe(seconds)
        if gpu_bytes is not None:
            self.gpu_memory.set(gpu_bytes)

    def on_depth(self, depth: int) -> None:
        self.queue_depth.set(depth)

    def on_stage(self, stage: str, seconds: float) -> None:
        """Per-image stages are the front-ends' figures (each image belongs to one of them)."""
