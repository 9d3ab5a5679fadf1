"""Batching and overload through a real server: concurrent requests share passes; excess gets 503."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import httpx
from PIL import Image

from tests.helpers import jpeg_bytes, make_settings, running_server
from tests.support import parse_metrics

PREDICT = "/api/v1/predict"


def _metric(text: str, name: str) -> float:
    return parse_metrics(text).get(name, 0.0)


def test_concurrent_requests_are_batched_and_answer_as_alone(tiny_checkpoint: Path, chelsea: Image.Image) -> None:
    photos = [jpeg_bytes(chelsea.rotate(angle)) for angle in range(0, 80, 10)]
    settings = make_settings(checkpoint_path=tiny_checkpoint, model_name="test_resnet", max_batch_wait_ms=300)
    with running_server(settings) as url:
        alone = [httpx.post(url + PREDICT, files={"file": p}).json()["predictions"] for p in photos]
        before = httpx.get(url + "/metrics").text
        with concurrent.futures.ThreadPoolExecutor(len(photos)) as pool:
            together = list(pool.map(lambda p: httpx.post(url + PREDICT, files={"file": p}, timeout=60), photos))
        after = httpx.get(url + "/metrics").text
    assert [r.status_code for r in together] == [200] * len(photos)
    for response, expected in zip(together, alone, strict=True):
        got = response.json()["predictions"]
        assert [p["index"] for p in got] == [p["index"] for p in expected]
    passes = _metric(after, "cat_breeds_api_inference_batch_size_count") - _metric(
        before, "cat_breeds_api_inference_batch_size_count"
    )
    images = _metric(after, "cat_breeds_api_inference_batch_size_sum") - _metric(
        before, "cat_breeds_api_inference_batch_size_sum"
    )
    assert images == len(photos)
    assert passes < len(photos), f"{len(photos)} concurrent requests took {passes} forward passes"


def test_over_capacity_is_503_with_retry_after_and_nothing_else(tiny_checkpoint: Path, chelsea: Image.Image) -> None:
    big = jpeg_bytes(chelsea.resize((2400, 1600)))
    settings = make_settings(checkpoint_path=tiny_checkpoint, model_name="test_resnet", max_queue=2, max_upload_mb=5)
    with running_server(settings) as url:
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            responses = list(pool.map(lambda _: httpx.post(url + PREDICT, files={"file": big}, timeout=60), range(32)))
        statuses = [r.status_code for r in responses]
        assert set(statuses) <= {200, 503} and 200 in statuses and 503 in statuses, statuses
        refused = [r for r in responses if r.status_code == 503]
        assert all(r.json()["error"]["code"] == "overloaded" and r.headers["retry-after"] for r in refused)
        assert httpx.get(url + "/health").status_code == 200
        metrics = httpx.get(url + "/metrics").text
        assert _metric(metrics, "cat_breeds_api_rejected_total{reason=overloaded}") == len(refused)
        assert _metric(metrics, "cat_breeds_api_queue_depth") == 0
