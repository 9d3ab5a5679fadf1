"""The commands users run, as separate processes: serve, uvicorn api.main:app, predict, demo-model."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import IMAGENET_CATS, wait_for

BIN = Path(sys.executable).parent
CLI = str(BIN / "cat-breeds-api")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(**values: object) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("API_") and k != "LOG_LEVEL"}
    env.update({k: str(v) for k, v in values.items()})
    return env


def _start(command: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
    """Start a server whose output goes to cwd/server.log (a pipe nobody reads would fill and stall it)."""
    with (cwd / "server.log").open("w") as log:
        return subprocess.Popen(command, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def served(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """`cat-breeds-api serve` with the demo model, as `make run` starts it."""
    port = _free_port()
    cwd = tmp_path_factory.mktemp("serve")
    process = _start([CLI, "serve"], _env(API_CHECKPOINT_PATH=demo_dir, API_PORT=port), cwd)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(url, "/health", timeout_s=120)
        yield url, process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


def test_serve_classifies_chelsea_with_the_seed_curl(
    served: tuple[str, subprocess.Popen[str]], tmp_path: Path, chelsea_jpeg: bytes
) -> None:
    url, _ = served
    photo = tmp_path / "chelsea.jpg"
    photo.write_bytes(chelsea_jpeg)
    # The README's command, as written.
    result = subprocess.run(
        ["curl", "-s", "-X", "POST", f"{url}/api/v1/predict", "-F", f"file=@{photo}"],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    body = json.loads(result.stdout)
    assert body["predictions"][0]["index"] in IMAGENET_CATS
    assert "server" not in httpx.get(f"{url}/health").headers  # no software banner


def test_cli_predict_remote_and_local_agree(
    served: tuple[str, subprocess.Popen[str]], demo_dir: Path, tmp_path: Path, chelsea_jpeg: bytes, coffee_jpeg: bytes
) -> None:
    url, _ = served
    folder = tmp_path / "photos"
    (folder / "nested").mkdir(parents=True)
    (folder / "chelsea.jpg").write_bytes(chelsea_jpeg)
    (folder / "nested" / "coffee.jpg").write_bytes(coffee_jpeg)
    (folder / "readme.md").write_text("not an image, skipped by extension")
    remote = subprocess.run([CLI, "predict", str(folder), "--url", url, "--format", "json", "--top-k", "3"],
                            capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=120)  # fmt: skip
    assert remote.returncode == 0, remote.stderr
    local = subprocess.run([CLI, "predict", str(folder), "--checkpoint", str(demo_dir), "--format", "json", "--top-k", "3"],
                           capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=120)  # fmt: skip
    assert local.returncode == 0, local.stderr
    remote_results, local_results = json.loads(remote.stdout), json.loads(local.stdout)
    assert [Path(r["path"]).name for r in remote_results] == ["chelsea.jpg", "coffee.jpg"]
    for a, b in zip(remote_results, local_results, strict=True):
        assert [p["index"] for p in a["predictions"]] == [p["index"] for p in b["predictions"]]
    assert remote_results[0]["predictions"][0]["index"] in IMAGENET_CATS


def test_cli_predict_csv_and_failures(demo_dir: Path, tmp_path: Path, chelsea_jpeg: bytes) -> None:
    (tmp_path / "cat.jpg").write_bytes(chelsea_jpeg)
    (tmp_path / "broken.jpg").write_bytes(chelsea_jpeg[:300])
    out = tmp_path / "results.csv"
    result = subprocess.run(
        [CLI, "predict", str(tmp_path / "cat.jpg"), str(tmp_path / "broken.jpg"), "--checkpoint", str(demo_dir),
         "--format", "csv", "--top-k", "2", "-o", str(out)],
        capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1  # one file failed: say so in the exit status
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert [r["rank"] for r in rows if r["path"].endswith("cat.jpg")] == ["1", "2"]
    assert [r["error"] for r in rows if r["path"].endswith("broken.jpg")] == ["invalid_image"]


def test_uvicorn_import_string_serves_from_environment(demo_dir: Path, tmp_path: Path, chelsea_jpeg: bytes) -> None:
    """`uvicorn api.main:app` (what the Compose files run) reads API_* and serves."""
    port = _free_port()
    env = _env(API_CHECKPOINT_PATH=demo_dir, API_TOP_K=2, LOG_LEVEL="debug")
    process = _start([str(BIN / "uvicorn"), "api.main:app", "--host", "127.0.0.1", "--port", str(port)], env, tmp_path)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(url, "/health/ready", timeout_s=120)
        body = httpx.post(url + "/api/v1/predict", files={"file": chelsea_jpeg}).json()
        assert len(body["predictions"]) == 2
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal so supervisors see why it stopped
        assert process.wait(timeout=30) in (0, -signal.SIGTERM)
        assert time.monotonic() - started < 30
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)
    output = (tmp_path / "server.log").read_text()
    assert "model ready: tf_efficientnet_lite0" in output
    assert "Application shutdown complete" in output


@pytest.mark.parametrize("launcher", ["cli", "uvicorn"])
def test_bad_setting_stops_startup_with_one_line(launcher: str, tmp_path: Path) -> None:
    command = [CLI, "serve"] if launcher == "cli" else [str(BIN / "uvicorn"), "api.main:app"]
    result = subprocess.run(
        command, env=_env(API_DEVICE="gpu"), cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if "API_DEVICE" in line]
    assert len(lines) == 1
    assert "API_DEVICE='gpu' is invalid: expected one of auto, cpu, cuda, cuda:N, mps" in lines[0]
    assert "Traceback" not in result.stderr


def test_missing_checkpoint_exits_nonzero_naming_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "outputs" / "checkpoints" / "fold_0" / "best_model.pt"
    env = _env(API_CHECKPOINT_PATH=missing, API_PORT=_free_port())
    result = subprocess.run([CLI, "serve"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 3
    errors = [line for line in result.stderr.splitlines() if "model load failed" in line]
    assert len(errors) == 1 and str(missing) in errors[0] and "/app/models" in errors[0]


def test_demo_model_command_is_idempotent(tmp_path: Path) -> None:
    target = tmp_path / "models" / "demo"
    first = subprocess.run([CLI, "demo-model", "--output", str(target)], capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert {p.name for p in target.iterdir()} == {"config.json", "model.safetensors"}
    stamp = (target / "model.safetensors").stat().st_mtime_ns
    again = subprocess.run([CLI, "demo-model", "--output", str(target)], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and (target / "model.safetensors").stat().st_mtime_ns == stamp
    config = json.loads((target / "config.json").read_text())
    assert config["architecture"] == "tf_efficientnet_lite0" and config["num_classes"] == 1000
