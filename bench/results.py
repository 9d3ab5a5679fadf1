"""What the bench measures, typed: the ceiling of one photo, and one concurrency level of the service."""

from __future__ import annotations

from typing import TypedDict


class CeilingResult(TypedDict):
    images_per_s: float  # median of `samples`
    samples: list[float]
    batch: int  # the best concurrency level of the sweep
    sweep: dict[int, float]
    forward_ms_per_image: float
    batch1_p50_ms: float
    batch1_ms: list[float]
    reduced: bool
    pipeline: str
    runtime: str
    precision: str
    runtime_reason: str


class LevelResult(TypedDict, total=False):
    concurrency: int
    requests: int
    images_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    statuses: dict[str, int]
    inference_busy: float
    mean_batch: float
    forward_ms_per_image: float
    service_pss_mb: float
