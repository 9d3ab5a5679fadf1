"""Liveness stays prompt while predictions run (a wall-clock bound: this tier only)."""

from __future__ import annotations

import concurrent.futures
import time

import httpx
from PIL import Image

from tests.helpers import jpeg_bytes

PREDICT = "/api/v1/predict"


def test_health_answers_promptly_while_predictions_run(tiny_server: str, chelsea: Image.Image) -> None:
    big = jpeg_bytes(chelsea.resize((2400, 1600)))  # a slow decode, under the fixture's 1 MiB limit
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(httpx.post, tiny_server + PREDICT, files={"file": big}, timeout=60) for _ in range(8)]
        worst = 0.0
        while not all(f.done() for f in futures):
            started = time.perf_counter()
            assert httpx.get(tiny_server + "/health/live").status_code == 200
            worst = max(worst, time.perf_counter() - started)
        assert [f.result().status_code for f in futures] == [200] * 8
    assert worst < 0.5, f"/health/live took {worst:.3f}s while predictions ran"
