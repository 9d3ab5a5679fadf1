"""Gunicorn with two workers, as the production Compose file runs it (`api.gunicorn_conf`).

Metrics are aggregated over the workers (a scrape finds N requests, not N/2), a worker killed
under load is replaced: requests on it fail fast, none hangs, and the new worker is ready soon, and
a worker whose model is still loading takes no connections (no request is answered "loading").
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import BIN, ServerProcess, eventually, served_process
from tests.support import engine_pids

GUNICORN = [str(BIN / "gunicorn"), "--config", "python:api.gunicorn_conf", "api.main:app"]
PREDICT = "/api/v1/predict"


def _workers(server: ServerProcess) -> list[int]:
    """Gunicorn's workers: the master's own children (the engine process is a worker's child)."""
    return [int(p) for p in Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()]


def _samples(server: ServerProcess) -> dict[str, float]:
    return server.metrics()


def _ready_pids(server: ServerProcess) -> set[int]:
    return {r["pid"] for r in server.records() if r.get("event") == "ready"}


@pytest.fixture
def two_workers(tiny_checkpoint: Path, tmp_path: Path) -> Iterator[ServerProcess]:
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    # left by an earlier run: the master must start from an empty directory, or it would be counted
    (metrics_dir / "counter_1.db").write_bytes(b"stale values from a previous run")
    env = {
        "API_CHECKPOINT_PATH": tiny_checkpoint,
        "API_MODEL_NAME": "test_resnet",
        "WEB_CONCURRENCY": 2,
        "API_NUM_THREADS": 1,
        "PROMETHEUS_MULTIPROC_DIR": metrics_dir,
    }
    with served_process(GUNICORN, tmp_path, **env) as server:
        eventually(lambda: len(_ready_pids(server)) == 2, timeout_s=120, what="both workers' models ready")
        yield server
        assert server.stop() == 0


def _predict_many(url: str, data: bytes, count: int, concurrency: int = 6) -> list[str]:
    def one(_: int) -> str:
        try:
            return str(httpx.post(url + PREDICT, files={"file": data}, timeout=30).status_code)
        except httpx.HTTPError as error:
            return type(error).__name__

    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, range(count)))


def _served_by(server: ServerProcess) -> set[int]:
    return {r["pid"] for r in server.records() if r.get("event") == "request" and r.get("path") == PREDICT}


def test_metrics_count_every_worker(two_workers: ServerProcess, chelsea_jpeg: bytes) -> None:
    count = 60
    assert _predict_many(two_workers.url, chelsea_jpeg, count) == ["200"] * count
    eventually(lambda: len(_served_by(two_workers)) == 2, what="both workers logged predictions")
    key = "cat_breeds_api_http_requests_total{method=POST,route=/api/v1/predict,status=200}"
    # several scrapes land on either worker: each must see all N requests
    seen = {_samples(two_workers).get(key) for _ in range(6)}
    assert seen == {float(count)}, f"scrapes saw {seen}, expected {count}"
    samples = _samples(two_workers)
    assert samples["cat_breeds_api_images_total{outcome=ok}"] == count
    assert samples["cat_breeds_api_stage_duration_seconds_count{stage=forward}"] == count


def test_killed_worker_is_replaced_and_nothing_hangs(two_workers: ServerProcess, chelsea_jpeg: bytes) -> None:
    victim, *others = _workers(two_workers)
    survivors = set(others)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        load = pool.submit(_predict_many, two_workers.url, chelsea_jpeg, 120)
        eventually(lambda: bool(_served_by(two_workers)), what="load started")
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        eventually(lambda: victim not in _workers(two_workers), what="the killed worker reaped")
        eventually(lambda: len(_workers(two_workers)) == 2, timeout_s=30, what="a replacement worker forked")
        (new,) = set(_workers(two_workers)) - survivors
        eventually(lambda: new in _ready_pids(two_workers), timeout_s=60, what="the replacement's model ready")
        replaced_s = time.monotonic() - killed
        statuses = load.result(timeout=120)  # every request ended: an answer or a fast error
    print(f"\nworker {victim} killed: replaced and ready after {replaced_s:.1f}s; outcomes {set(statuses)}")
    assert replaced_s < 30
    failed = [s for s in statuses if s != "200"]
    assert set(failed) <= {"RemoteProtocolError", "ReadError", "ConnectError"}, set(failed)
    assert len(failed) <= 6, f"{len(failed)} failed requests: only those on the killed worker may fail"
    assert _predict_many(two_workers.url, chelsea_jpeg, 10) == ["200"] * 10
    assert _samples(two_workers)["cat_breeds_api_model_ready"] == 1.0  # the dead worker's gauge is gone


def test_requests_sent_while_workers_load_wait_for_a_ready_one(
    tiny_checkpoint: Path, tmp_path: Path, chelsea_jpeg: bytes
) -> None:
    env = {"API_CHECKPOINT_PATH": tiny_checkpoint, "API_MODEL_NAME": "test_resnet", "WEB_CONCURRENCY": 2}
    with served_process(GUNICORN, tmp_path, ready=False, **env) as server:
        statuses, sent_while_loading = [], 0
        while len(_ready_pids(server)) < 2:
            loading = not _ready_pids(server)
            try:
                response = httpx.post(server.url + PREDICT, files={"file": chelsea_jpeg}, timeout=60)
            except httpx.ConnectError:  # the master has not bound the port yet
                assert server.process.poll() is None, server.log()[-3000:]
                time.sleep(0.05)
                continue
            statuses.append(response.status_code)
            sent_while_loading += loading
        assert sent_while_loading >= 1, "no request was sent before a worker was ready: the check proved nothing"
        # sent while both models were loading, each waited for a ready worker instead of a 503 "loading"
        assert set(statuses) == {200}, statuses
        assert server.stop() == 0


def test_each_record_is_written_once(two_workers: ServerProcess, chelsea_jpeg: bytes) -> None:
    """One owner of logging per process: N requests, N access lines; one `ready` line per worker."""
    count = 24
    assert _predict_many(two_workers.url, chelsea_jpeg, count) == ["200"] * count

    def access() -> list[dict]:
        return [r for r in two_workers.records() if r.get("event") == "request" and r.get("path") == PREDICT]

    eventually(lambda: len(access()) >= count, what="every request logged")
    lines = access()
    assert len(lines) == count, f"{len(lines)} access lines for {count} requests"
    assert len({line["request_id"] for line in lines}) == count
    ready = [r["pid"] for r in two_workers.records() if r.get("event") == "ready"]
    assert len(ready) == 2 and len(set(ready)) == 2, f"ready events by pid: {ready}"
    raw = two_workers.log().splitlines()
    assert len(raw) == len(set(raw)), "a line was written twice"


def test_only_the_engine_loads_torch(two_workers: ServerProcess) -> None:
    """Gunicorn's master and its workers (the front-ends) never load torch: one engine process does."""
    tree = two_workers.children()
    engines = engine_pids(two_workers.pid)
    assert len(engines) == 1 and "libtorch" in Path(f"/proc/{engines[0]}/maps").read_text()  # the check sees it
    for pid in [two_workers.pid, *(p for p in tree if p not in engines)]:
        assert "libtorch" not in Path(f"/proc/{pid}/maps").read_text(), pid
