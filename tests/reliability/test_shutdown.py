"""SIGTERM under load (`cat-breeds-api serve`): readiness turns 503 first, predictions go on for
API_SHUTDOWN_DELAY_S, requests in flight complete, later ones are refused cleanly (connection
refused or 503, never a hang), and the process exits within the grace period."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import httpx

from tests.helpers import CLI, served_process

DELAY_S = 2.0
GRACE_S = 10.0


def test_sigterm_flips_readiness_then_drains_and_exits(
    tiny_checkpoint: Path, chelsea_jpeg: bytes, tmp_path: Path
) -> None:
    env = {
        "API_CHECKPOINT_PATH": tiny_checkpoint,
        "API_MODEL_NAME": "test_resnet",
        "API_SHUTDOWN_DELAY_S": DELAY_S,
        "API_GRACEFUL_TIMEOUT_S": GRACE_S,
    }
    results: list[tuple[float, float, str]] = []  # (sent, answered, status or error name)
    stop = threading.Event()

    with served_process([CLI, "serve"], tmp_path, **env) as server:

        def client() -> None:
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    # a new connection each time, as separate clients behind a load balancer
                    status = str(
                        httpx.post(server.url + "/api/v1/predict", files={"file": chelsea_jpeg}, timeout=30).status_code
                    )
                except httpx.HTTPError as error:
                    status = type(error).__name__
                results.append((sent, time.monotonic(), status))

        threads = [threading.Thread(target=client) for _ in range(4)]
        for thread in threads:
            thread.start()
        try:
            time.sleep(0.5)  # let the load run before the signal (this is the scenario, not a wait for readiness)
            signalled = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            ready = httpx.get(server.url + "/health/ready", timeout=5)
            flipped = time.monotonic() - signalled
            exit_code = server.process.wait(timeout=DELAY_S + GRACE_S + 10)
            exited = time.monotonic() - signalled
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=40)

    assert ready.status_code == 503 and ready.json()["status"] == "draining", ready.text
    assert flipped < 1.0
    assert exit_code in (0, -signal.SIGTERM) and exited < DELAY_S + GRACE_S, (exit_code, exited)
    assert not any(thread.is_alive() for thread in threads), "a request hung"
    before = [status for sent, _, status in results if sent < signalled]
    assert before and set(before) == {"200"}, f"requests in flight at SIGTERM: {before}"
    during = [
        status for sent, answered, status in results if signalled <= sent and answered < signalled + DELAY_S - 0.2
    ]
    assert during and set(during) == {"200"}, f"predictions while draining: {set(during)}"
    after = {status for sent, _, status in results if sent > signalled + DELAY_S + 0.5}
    assert after <= {"ConnectError", "503"}, f"after the drain began: {after}"
    records = server.records()
    assert any("not ready; serving" in r["message"] for r in records)
