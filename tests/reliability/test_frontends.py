"""One engine process, many front-ends (`uvicorn api.main:app --workers 2`), as real processes.

The front-ends never import torch; admission is counted over all of them; if the engine dies every
front-end's readiness says 503 at once while predictions sent meanwhile wait for the new engine (and
are answered); `/metrics` holds the engine's figures once; SIGTERM ends the engine last, after the
in-flight request is answered.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import BIN, ServerProcess, eventually, served_process
from tests.support import cmdline, engine_pids

PREDICT = "/api/v1/predict"
UVICORN_WORKERS = [str(BIN / "uvicorn"), "api.main:app", "--host", "127.0.0.1", "--port", "{port}", "--workers", "2"]


def engines(server: ServerProcess) -> list[int]:
    return engine_pids(server.pid)


def frontends(server: ServerProcess) -> list[int]:
    return [
        pid
        for pid in server.children()
        if "multiprocessing.spawn" in cmdline(pid)
        and "spawn_main" in cmdline(pid)
        and "resource_tracker" not in cmdline(pid)
    ]


def _maps(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


@pytest.fixture
def server(tiny_checkpoint: Path, tmp_path: Path) -> Iterator[ServerProcess]:
    env = {"API_CHECKPOINT_PATH": tiny_checkpoint, "API_MODEL_NAME": "test_resnet", "API_MAX_QUEUE": 2}
    with served_process(UVICORN_WORKERS, tmp_path, **env) as started:
        eventually(lambda: len(frontends(started)) == 2 and len(engines(started)) == 1, what="2 front-ends, 1 engine")
        eventually(
            lambda: sum(r.get("event") == "ready" for r in started.records()) == 2,
            timeout_s=60,
            what="both front-ends ready",
        )
        yield started


def _predict(server: ServerProcess, data: bytes) -> httpx.Response:
    return httpx.post(server.url + PREDICT, files={"file": ("cat.jpg", data, "image/jpeg")}, timeout=30)


def test_front_ends_never_import_torch_and_one_engine_serves_both(server: ServerProcess, chelsea_jpeg: bytes) -> None:
    answers = [_predict(server, chelsea_jpeg) for _ in range(12)]
    assert {r.status_code for r in answers} == {200}
    assert len({tuple(p["score"] for p in r.json()["predictions"]) for r in answers}) == 1  # one model
    served = {r["pid"] for r in server.records() if r.get("event") == "request" and r.get("path") == PREDICT}
    (engine,) = engines(server)
    assert "libtorch" in _maps(engine)  # the check sees torch where it is
    for pid in frontends(server):
        assert "libtorch" not in _maps(pid), f"front-end {pid} mapped libtorch"
        assert "libopenvino" not in _maps(pid)
    assert served <= set(frontends(server))


def _hold(server: ServerProcess) -> socket.socket:
    """A request admitted and not finished: headers and part of the body sent (admission comes first)."""
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(
        f"POST {PREDICT} HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 100000\r\n\r\n".encode()
        + b"\xff\xd8\xff"
        + b"\0" * 1000
    )
    return sock


def test_admission_is_counted_over_all_front_ends(server: ServerProcess, chelsea_jpeg: bytes) -> None:
    held = [_hold(server), _hold(server)]  # API_MAX_QUEUE=2, whichever front-ends took them
    try:
        eventually(lambda: server.metrics().get("cat_breeds_api_queue_depth") == 2.0, what="2 admitted")
        statuses = [_predict(server, chelsea_jpeg) for _ in range(10)]
        assert {r.status_code for r in statuses} == {503}, [r.status_code for r in statuses]
        assert {r.json()["error"]["code"] for r in statuses} == {"overloaded"}
        assert all(r.headers.get("retry-after") for r in statuses)
    finally:
        for sock in held:
            sock.close()
    eventually(lambda: _predict(server, chelsea_jpeg).status_code == 200, what="room again")


def test_a_dead_engine_turns_readiness_503_while_predictions_wait_for_the_next(
    server: ServerProcess, chelsea_jpeg: bytes
) -> None:
    (engine,) = engines(server)
    os.kill(engine, signal.SIGKILL)
    killed = time.monotonic()
    health = []
    while time.monotonic() - killed < 1.0:  # every front-end says so within a second
        health.append(httpx.get(server.url + "/health", timeout=5).status_code)
    # Strict: the new engine takes seconds to load, so by the second half of that second every
    # front-end answers 503 (a single early 503, or none, fails), and none says ready too soon.
    late = health[len(health) // 2 :]
    assert late and set(late) == {503}, health
    predictions = [_predict(server, chelsea_jpeg).status_code for _ in range(4)]  # sent while it restarts
    assert predictions == [200] * 4
    eventually(lambda: bool(engines(server)) and engines(server) != [engine], timeout_s=30, what="a new engine")
    eventually(
        lambda: all(httpx.get(server.url + "/health").status_code == 200 for _ in range(6)),
        timeout_s=60,
        what="ready again",
    )
    print(f"\nengine killed: readiness 503, predictions answered, ready again after {time.monotonic() - killed:.1f}s")
    assert {_predict(server, chelsea_jpeg).status_code for _ in range(8)} == {200}
    assert all("libtorch" not in _maps(pid) for pid in frontends(server))


def test_metrics_hold_the_engine_figures_once(server: ServerProcess, chelsea_jpeg: bytes) -> None:
    count = 10
    assert {_predict(server, chelsea_jpeg).status_code for _ in range(count)} == {200}
    text = httpx.get(server.url + "/metrics").text
    assert text.count("# TYPE cat_breeds_api_inference_batch_size histogram") == 1
    assert text.count("# TYPE cat_breeds_api_queue_depth gauge") == 1
    samples = server.metrics()
    assert samples["cat_breeds_api_inference_batch_size_sum"] == count  # every image in one of its batches


def test_sigterm_answers_in_flight_work_and_stops_the_engine_last(server: ServerProcess, chelsea_jpeg: bytes) -> None:
    (engine,) = engines(server)
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(
        f"POST {PREDICT} HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: {len(chelsea_jpeg)}\r\n\r\n".encode()
        + chelsea_jpeg[:100]
    )
    eventually(lambda: server.metrics().get("cat_breeds_api_queue_depth") == 1.0, what="admitted")
    server.process.send_signal(signal.SIGTERM)
    time.sleep(0.2)  # let the signal land before the rest of the body (no readiness to poll on a draining socket)
    sock.sendall(chelsea_jpeg[100:])
    answer = sock.recv(65536).decode(errors="replace")
    assert answer.startswith("HTTP/1.1 200"), answer[:300]
    sock.close()
    assert server.process.wait(timeout=60) == 0
    eventually(
        lambda: not Path(f"/proc/{engine}").exists() or "zombie" in Path(f"/proc/{engine}/status").read_text().lower(),
        timeout_s=30,
        what="the engine ended",
    )
