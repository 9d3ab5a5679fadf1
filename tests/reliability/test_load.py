"""Load beyond capacity and a soak, against `cat-breeds-api serve` as a separate process.

Overload: the capacity is measured first (resnet50, 224 px, 67 classes: the default model), then
requests arrive open-loop at 4x that rate. Only 200, 503 (with Retry-After) or 504 may come back,
every request gets an answer, the accepted ones stay fast (bounded by the queue), and memory
returns to its level before the overload. Soak: thousands of predictions, bounded RSS growth.
"""

from __future__ import annotations

import asyncio
import statistics
from pathlib import Path

import httpx
import numpy as np
import pytest
import timm
import torch

from api.engine.model.files.labels import CAT_BREEDS
from tests import loadgen
from tests.helpers import CLI, ServerProcess, eventually, served_process
from tests.loadgen import Outcome, post

MAX_QUEUE = 16
ROOT = Path(__file__).resolve().parents[2]


def _load(mode: str, url: str, image: Path, **options: float) -> Outcome:
    """Run the load generator in a process of its own (see tests/loadgen.py) and read its outcome."""
    return loadgen.finish(loadgen.start(mode, url, image, **options))


@pytest.fixture(scope="module")
def resnet50_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = timm.create_model("resnet50", pretrained=False, num_classes=67)
    path = tmp_path_factory.mktemp("resnet50") / "best_model.pt"
    torch.save({"model_state_dict": model.state_dict(), "class_names": list(CAT_BREEDS)}, path)
    return path


def _queue_depth(server: ServerProcess) -> float:
    return server.metrics()["cat_breeds_api_queue_depth"]


def test_four_times_capacity_sheds_load_and_loses_nothing(
    resnet50_checkpoint: Path, chelsea_jpeg: bytes, tmp_path: Path
) -> None:
    env = {
        "API_CHECKPOINT_PATH": resnet50_checkpoint,
        "API_MODEL_NAME": "resnet50",
        "API_NUM_CLASSES": 67,
        "API_MAX_QUEUE": MAX_QUEUE,
        "API_REQUEST_TIMEOUT_S": 10,
        "LOG_LEVEL": "WARNING",
        "MALLOC_ARENA_MAX": 2,  # as `make run` and the image
    }
    image = tmp_path / "chelsea.jpg"
    image.write_bytes(chelsea_jpeg)
    with served_process([CLI, "serve"], tmp_path, **env) as server:
        measured = _load("closed", server.url, image, concurrency=MAX_QUEUE, seconds=4)
        assert set(measured.statuses) == {"200"}, measured.statuses
        capacity = len(measured.latencies_200) / measured.wall_s
        baseline_mb = server.rss_mb()

        duration = 5.0
        overload = _load("open", server.url, image, rate=4 * capacity, seconds=duration)
        sent = sum(overload.statuses.values())
        eventually(lambda: _queue_depth(server) == 0, what="queue drained")
        # memory returns to where it was: freed blocks are kept while busy, handed back after a quiet
        # second (glibc keeps a little: 64 MiB of slack)
        eventually(lambda: server.rss_mb() <= baseline_mb + 64, timeout_s=5, what="memory back to its baseline")
        after_mb = server.rss_mb()
        assert server.process.poll() is None, "the server died under overload"
        assert httpx.get(server.url + "/health").status_code == 200

    ok = overload.statuses.get("200", 0)
    p99 = float(np.percentile(overload.latencies_200, 99)) if ok else float("nan")
    print(
        f"\ncapacity {capacity:.1f} img/s; overload {4 * capacity:.1f} req/s for {duration:g}s: {overload.statuses}; "
        f"served {ok / duration:.1f} img/s, p50 {statistics.median(overload.latencies_200) * 1000:.0f} ms, "
        f"p99 {p99 * 1000:.0f} ms (the client's event loop ran up to {overload.loop_lag_max_s * 1000:.0f} ms "
        f"late); RSS {baseline_mb:.0f} -> {after_mb:.0f} MiB"
    )
    # every request got an answer, and only these answers
    assert set(overload.statuses) <= {"200", "503", "504"}, overload.statuses
    assert sent == int(4 * capacity * duration)
    assert overload.statuses.get("503", 0) > 0 and overload.missing_retry_after == 0
    # the accepted ones were served near capacity, and their wait is bounded by the queue
    assert ok >= 0.5 * capacity * duration, (ok, capacity)
    assert p99 <= 2 * MAX_QUEUE / capacity + 1.0, f"p99 {p99:.2f}s for a queue of {MAX_QUEUE}"


def test_soak_thousands_of_predictions_with_flat_memory(
    tiny_checkpoint: Path, chelsea_jpeg: bytes, tmp_path: Path
) -> None:
    env = {
        "API_CHECKPOINT_PATH": tiny_checkpoint,
        "API_MODEL_NAME": "test_resnet",
        "LOG_LEVEL": "WARNING",
        "MALLOC_ARENA_MAX": 2,
    }
    with served_process([CLI, "serve"], tmp_path, **env) as server:

        async def run(total: int) -> Outcome:
            outcome = Outcome()
            async with httpx.AsyncClient(limits=httpx.Limits(max_connections=8), timeout=60) as client:
                for start in range(0, total, 8):
                    count = min(8, total - start)
                    await asyncio.gather(*(post(client, server.url, chelsea_jpeg, outcome) for _ in range(count)))
            return outcome

        warm = asyncio.run(run(400))  # allocator pools, caches and the first batch shapes settle here
        warm_mb = server.rss_mb()
        soak = asyncio.run(run(3000))
        end_mb = server.rss_mb()
    print(f"\nsoak: 3000 predictions after 400 warm-up; RSS {warm_mb:.0f} -> {end_mb:.0f} MiB")
    assert warm.statuses == {"200": 400} and soak.statuses == {"200": 3000}
    # RSS wanders by about +-8 MiB here without trend; keeping any image (150 KB decoded) would be ~450 MiB
    assert end_mb - warm_mb <= 40, f"RSS grew {end_mb - warm_mb:.1f} MiB over 3000 predictions"
