"""Swapping the model under load, with Gunicorn's two front-ends and the engine process, as real processes.

Steady clients (one connection each, /api/v1 and /v2) run while the model is swapped three ways:
a new checkpoint (the switch), a corrupt one and one with other labels (refused, the old model keeps
serving), and a slow one with a second load sent meanwhile (409). Every answer must be a 200, name
the version that produced it, and switch versions once per connection, never back; readiness never
drops; the new model's scores are the new checkpoint's.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from timm.models import save_for_hf

from api.config import load_settings
from api.engine.serving.service import Engine
from tests.helpers import BIN, CLI, ServerProcess, eventually, process_env, served_process, tiny_model
from tests.support import engine_pids

GUNICORN = [str(BIN / "gunicorn"), "--config", "python:api.gunicorn_conf", "api.main:app"]
ADMIN = {"X-API-Key": "admin-secret"}
LABELS = "abyssinian\nbengal\nbirman\nbombay\npersian\n"


def _checkpoint(folder: Path, name: str, model: torch.nn.Module, architecture: str) -> Path:
    path = folder / name
    torch.save({"architecture": architecture, "state_dict": model.state_dict()}, path)
    return path


def _slow_model(folder: Path) -> Path:
    """A real-size model (resnet50, another architecture and preprocessing) as a timm model folder: its
    load takes long enough for a second load to arrive meanwhile. Its input is the served model's
    size (a larger one needs a restart: the front-ends' shared-memory slots are sized at start)."""
    save_for_hf(tiny_model("resnet50", seed=2), folder, safe_serialization=True)
    config = json.loads((folder / "config.json").read_text())
    config["pretrained_cfg"]["input_size"] = [3, 160, 160]
    config["label_names"] = LABELS.split()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    (folder / "classes.txt").write_text(LABELS)
    (folder / "corrupt.pt").write_bytes(b"PK\x03\x04 this is no checkpoint" * 64)
    (folder / "four").mkdir()
    four = folder / "four"
    return {
        "old": _checkpoint(folder, "old.pt", tiny_model(seed=0), "test_resnet"),
        "new": _checkpoint(folder, "new.pt", tiny_model(seed=1), "test_resnet"),
        "slow": _slow_model(folder / "slow"),
        "corrupt": folder / "corrupt.pt",
        "four": _checkpoint(four, "four.pt", tiny_model(num_classes=4), "test_resnet"),
    }


@pytest.fixture(scope="module")
def server(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    cwd = tmp_path_factory.mktemp("swap")
    metrics = cwd / "metrics"
    metrics.mkdir()
    env = {
        "API_CHECKPOINT_PATH": models["old"],
        "API_ADMIN_KEY": ADMIN["X-API-Key"],
        "API_RUNTIME": "torch",
        "API_PRECISION": "fp32",
        "WEB_CONCURRENCY": 2,
        "API_NUM_THREADS": 1,
        "PROMETHEUS_MULTIPROC_DIR": metrics,
    }
    with served_process(GUNICORN, cwd, **env) as running:
        yield running


def _reference_scores(checkpoint: Path, data: bytes) -> np.ndarray:
    """The checkpoint's scores for `data` through the serving pipeline, in this process."""
    settings = load_settings(checkpoint_path=checkpoint, runtime="torch", precision="fp32")
    engine = Engine.start(settings.model_group, settings.batching_group)
    try:
        (outcome,) = asyncio.run(engine.classify_all([data], top_k=5)).outcomes
        return np.asarray(outcome.scores)
    finally:
        engine.close()


@dataclass
class Clients:
    """Steady load: each thread one connection, recording every answer's status, version and scores."""

    url: str
    data: bytes
    answers: dict[str, list[tuple[int, str, tuple[float, ...]]]] = field(default_factory=dict)
    not_ready: list[str] = field(default_factory=list)
    timings: list[tuple[float, float]] = field(default_factory=list)  # (sent at, seconds to answer)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self, v1: int = 3, v2: int = 1) -> None:
        for n in range(v1):
            self._spawn(f"v1-{n}", self._v1)
        for n in range(v2):
            self._spawn(f"v2-{n}", self._v2)
        self._spawn("ready", self._ready, record=False)

    def _spawn(self, name: str, target: object, record: bool = True) -> None:
        if record:
            self.answers[name] = []
        thread = threading.Thread(target=target, args=(name,), daemon=True)  # type: ignore[arg-type]
        thread.start()
        self.threads.append(thread)

    def _v1(self, name: str) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as client:
            while not self.stop.is_set():
                sent = time.monotonic()
                response = client.post("/api/v1/predict?top_k=5", files={"file": ("c.jpg", self.data)})
                self.timings.append((sent, time.monotonic() - sent))
                if response.status_code != 200:
                    self.answers[name].append((response.status_code, response.text, ()))
                    continue
                body = response.json()
                scores = tuple(p["score"] for p in sorted(body["predictions"], key=lambda p: p["index"]))
                self.answers[name].append((200, body["model"]["version"], scores))

    def _v2(self, name: str) -> None:
        payload = {
            "inputs": [
                {"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(self.data).decode()]}
            ]
        }
        with httpx.Client(base_url=self.url, timeout=60) as client:
            while not self.stop.is_set():
                sent = time.monotonic()
                response = client.post("/v2/models/cat-breeds/infer", json=payload)
                self.timings.append((sent, time.monotonic() - sent))
                if response.status_code != 200:
                    self.answers[name].append((response.status_code, response.text, ()))
                    continue
                body = response.json()
                self.answers[name].append((200, body["model_version"], tuple(body["outputs"][0]["data"])))

    def _ready(self, _: str) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as client:
            while not self.stop.is_set():
                for path in ("/health/ready", "/v2/health/ready"):
                    response = client.get(path)
                    if response.status_code != 200:
                        self.not_ready.append(f"{path} {response.status_code} {response.text}")
                time.sleep(0.02)

    def counts(self) -> dict[str, int]:
        return {name: len(answers) for name, answers in self.answers.items()}

    def wait_for_more(self, more: int = 5) -> None:
        start = self.counts()
        eventually(
            lambda: all(len(a) >= start[n] + more for n, a in self.answers.items()), timeout_s=60, what="answers"
        )

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)


def _load(url: str, checkpoint: Path | None, timeout: float = 300) -> httpx.Response:
    body = {"parameters": {"checkpoint": str(checkpoint)}} if checkpoint else {}
    return httpx.post(f"{url}/v2/repository/models/cat-breeds/load", json=body, headers=ADMIN, timeout=timeout)


def test_swap_under_load(server: ServerProcess, models: dict[str, Path], chelsea_jpeg: bytes) -> None:
    old_version = httpx.get(server.url + "/api/v1/model").json()["version"]
    clients = Clients(server.url, chelsea_jpeg)
    clients.start()
    try:
        clients.wait_for_more()

        called = time.monotonic()
        swapped = _load(server.url, Path("new.pt"))  # relative: from the configured checkpoint's folder
        call_s = time.monotonic() - called
        assert swapped.status_code == 200, swapped.text
        figures = swapped.json()
        new_version = figures["version"]
        assert figures["previous_version"] == old_version != new_version
        clients.wait_for_more()

        corrupt = _load(server.url, models["corrupt"])
        assert corrupt.status_code == 400 and "model load failed" in corrupt.json()["error"], corrupt.text
        relabelled = _load(server.url, models["four"])
        assert relabelled.status_code == 400 and "labels differ" in relabelled.json()["error"], relabelled.text
        missing = _load(server.url, Path("no-such.pt"))
        assert missing.status_code == 400 and "no checkpoint at" in missing.json()["error"]
        clients.wait_for_more()

        slow: dict[str, httpx.Response] = {}
        loading = threading.Thread(target=lambda: slow.update(answer=_load(server.url, models["slow"])))
        loading.start()
        eventually(lambda: f"loading {models['slow']} beside" in server.log(), timeout_s=30, what="the slow load")
        busy = _load(server.url, models["new"])
        loading.join(timeout=300)
        assert busy.status_code == 409 and "already running" in busy.json()["error"], busy.text
        assert slow["answer"].status_code == 200, slow["answer"].text
        slow_version = slow["answer"].json()["version"]
        clients.wait_for_more()
    finally:
        clients.finish()

    answers = [a for per_client in clients.answers.values() for a in per_client]
    failures = [a for a in answers if a[0] != 200]
    during = [seconds for sent, seconds in clients.timings if called - 0.1 <= sent <= called + call_s]
    before = sorted(seconds for sent, seconds in clients.timings if sent < called)
    print(
        f"latency: median before the swap {before[len(before) // 2] * 1000:.1f} ms, worst while it ran "
        f"{max(during, default=0) * 1000:.1f} ms ({len(during)} requests)"
    )
    print(
        f"swap under load: {len(answers)} answers, {len(failures)} non-200; load call {call_s:.3f}s "
        f"(load {figures['load_s']}s, switch {figures['switch_s'] * 1000:.1f} ms); resnet50: load "
        f"{slow['answer'].json()['load_s']}s, switch {slow['answer'].json()['switch_s'] * 1000:.1f} ms"
    )
    assert not failures, failures[:5]
    assert not clients.not_ready, clients.not_ready[:5]
    order = [old_version, new_version, slow_version]
    for name, per_client in clients.answers.items():
        versions = [version for _, version, _ in per_client]
        seen = [v for i, v in enumerate(versions) if i == 0 or versions[i - 1] != v]  # each run of one version
        assert seen == order, f"{name}: versions switched {seen}, not once per swap in order {order}"

    new_scores = {scores for _, version, scores in answers if version == new_version}
    old_scores = {scores for _, version, scores in answers if version == old_version}
    assert len(new_scores) == 1 and len(old_scores) == 1  # one image: one answer per model, every time
    reference = _reference_scores(models["new"], chelsea_jpeg)
    np.testing.assert_allclose(next(iter(new_scores)), reference, rtol=1e-5, atol=1e-6)
    assert not np.allclose(next(iter(old_scores)), reference, atol=1e-4)  # different weights, different scores

    released = [r for r in server.records() if str(r.get("message", "")).startswith("the previous model (version")]
    assert len(released) == 2 and all("(freed)" in r["message"] for r in released), released  # two swaps
    switched = {r["pid"] for r in server.records() if str(r.get("message", "")).startswith("switched to model version")}
    assert len(switched) == 2, "both Gunicorn front-ends switched"
    metrics = httpx.get(server.url + "/metrics").text
    info = [line for line in metrics.splitlines() if line.startswith("cat_breeds_api_model_info{")]
    assert len(info) == 1 and f'version="{slow_version}"' in info[0], info

    # the engine process dies: the one started in its place serves the swapped-in model, not the configured one
    killed = engine_pids(server.pid)
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    # /api/v1/model answers throughout (the last model served); the restarted engine is a new process
    eventually(lambda: engine_pids(server.pid) not in ([], killed), timeout_s=120, what="a restarted engine")
    eventually(lambda: server.metrics().get("cat_breeds_api_model_ready") == 1.0, timeout_s=60, what="both ready")
    predicted = httpx.post(server.url + "/api/v1/predict", files={"file": ("c.jpg", chelsea_jpeg)}, timeout=60)
    assert predicted.json()["model"]["version"] == slow_version, "the restarted engine serves the swapped-in model"


def test_the_cli_swaps_back_and_reports(server: ServerProcess, models: dict[str, Path]) -> None:
    result = subprocess.run(
        [CLI, "reload", "--url", server.url],  # no checkpoint: the configured one, read again
        env=process_env(API_ADMIN_KEY=ADMIN["X-API-Key"]),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    version = httpx.get(server.url + "/api/v1/model").json()["version"]
    assert f"version {version}" in result.stdout and str(models["old"]) in result.stdout
    refused = subprocess.run(
        [CLI, "reload", str(models["corrupt"]), "--url", server.url],
        env=process_env(API_ADMIN_KEY=ADMIN["X-API-Key"]),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert refused.returncode == 1 and "reload refused (400)" in refused.stderr
    wrong_key = subprocess.run(
        [CLI, "reload", "--url", server.url], env=process_env(API_ADMIN_KEY="wrong"), capture_output=True, text=True
    )
    assert wrong_key.returncode == 1 and "401" in wrong_key.stderr
    assert httpx.get(server.url + "/api/v1/model").json()["version"] == version


def test_on_a_cpu_the_new_model_is_converted_in_a_process_of_its_own(
    models: dict[str, Path], tmp_path: Path, chelsea_jpeg: bytes
) -> None:
    """OpenVINO conversion and measuring the candidates (INT8 quantized, every precision timed) hold
    Python's lock in long stretches: a swap does both in a separate process (api/remote/host/prepare.py),
    and the engine serves what it resolved from the cache (api/engine/model/snapshot.py): the converted
    model and the measured choice, with no PyTorch model built."""
    env = {
        "API_CHECKPOINT_PATH": models["old"],
        "API_ADMIN_KEY": ADMIN["X-API-Key"],
        "API_RUNTIME": "openvino",
        "API_PRECISION": "auto",
    }
    with served_process([CLI, "serve"], tmp_path, **env) as server:
        answer = _load(server.url, models["new"])
        assert answer.status_code == 200, answer.text
        log = server.log()
        after = log[log.index(f"loading {models['new']} beside") :]
        assert "new model prepared in a process of its own" in after
        assert "served as the cache's snapshot describes it" in after and "converted the model to OpenVINO" not in after
        assert "candidates measured" not in after
        predicted = httpx.post(server.url + "/api/v1/predict", files={"file": ("c.jpg", chelsea_jpeg)})
        assert predicted.json()["model"]["version"] == answer.json()["version"]
        evaluation = httpx.get(server.url + "/api/v1/model").json()["evaluation"]
        assert {c["precision"] for c in evaluation["candidates"]} >= {"fp32", "int8"}  # the new model's, measured
        assert evaluation["chosen"] == {"runtime": "openvino", "precision": "fp32"}  # no images: exact


def _ready_workers(server: ServerProcess) -> set[int]:
    return {r["pid"] for r in server.records() if r.get("event") == "ready"}


def _served_by(server: ServerProcess, pid: int, message: str) -> bool:
    return any(r["pid"] == pid and message in str(r.get("message", "")) for r in server.records())


def test_a_stuck_front_end_is_disconnected_and_comes_back_with_the_new_model(
    models: dict[str, Path], tmp_path: Path, chelsea_jpeg: bytes
) -> None:
    """A front-end whose event loop does not run (stopped here with SIGSTOP) cannot confirm the
    switch. After API_REQUEST_TIMEOUT_S the engine disconnects it: the old model retires and the call
    is answered, while the other front-end answers throughout; once it runs again it connects again
    and serves the new model."""
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    env = {
        "API_CHECKPOINT_PATH": models["old"],
        "API_ADMIN_KEY": ADMIN["X-API-Key"],
        "API_RUNTIME": "torch",
        "API_PRECISION": "fp32",
        "API_REQUEST_TIMEOUT_S": 2,
        "WEB_CONCURRENCY": 2,
        "API_NUM_THREADS": 1,
        "PROMETHEUS_MULTIPROC_DIR": metrics,
    }
    with served_process(GUNICORN, tmp_path, **env) as server:
        eventually(lambda: len(_ready_workers(server)) == 2, timeout_s=120, what="both front-ends on the engine")
        stuck, live = sorted(_ready_workers(server))
        old_version = httpx.get(server.url + "/api/v1/model").json()["version"]
        os.kill(stuck, signal.SIGSTOP)
        clients = Clients(server.url, chelsea_jpeg)
        try:
            clients.start(v1=2, v2=1)  # connections made now: the live front-end accepts them all
            clients.wait_for_more()
            answer = _load(server.url, models["new"])
            clients.wait_for_more()
        finally:
            clients.finish()
            os.kill(stuck, signal.SIGCONT)
        assert answer.status_code == 200, answer.text
        figures = answer.json()
        assert figures["frontends_dropped"] == 1 and figures["switch_s"] >= 2, figures
        answers = [a for per_client in clients.answers.values() for a in per_client]
        assert [a for a in answers if a[0] != 200] == []
        assert clients.not_ready == []
        for name, per_client in clients.answers.items():
            versions = [version for _, version, _ in per_client]
            seen = [v for i, v in enumerate(versions) if i == 0 or versions[i - 1] != v]
            assert seen == [old_version, figures["version"]], f"{name}: versions {seen}"
        assert "did not confirm the switch to model version" in server.log()

        # running again, it finds its link closed (and why), connects again and gets the new model
        eventually(
            lambda: _served_by(server, stuck, "engine process connected again"), timeout_s=60, what="reconnected"
        )
        assert _served_by(server, stuck, "lost the engine process (front-end")
        os.kill(live, signal.SIGSTOP)  # so that the next connection is the other front-end's
        try:
            with httpx.Client(base_url=server.url, timeout=30) as client:
                predicted = client.post("/api/v1/predict", files={"file": ("c.jpg", chelsea_jpeg)})
        finally:
            os.kill(live, signal.SIGCONT)
        assert predicted.status_code == 200, predicted.text
        assert predicted.json()["model"]["version"] == figures["version"]
        assert _served_by(server, stuck, "POST /api/v1/predict")
        print(
            f"stuck front-end: {len(answers)} answers from the other, 0 non-200; call answered after "
            f"{figures['total_s']}s (switch {figures['switch_s']}s, API_REQUEST_TIMEOUT_S=2)"
        )
