"""The commands users run, as separate processes: serve, uvicorn api.main:app, predict, demo-model."""

from __future__ import annotations

import csv
import io
import json
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.helpers import BIN, CLI, IMAGENET_CATS, jpeg_bytes, wait_for
from tests.helpers import free_port as _free_port
from tests.helpers import process_env as _env
from tests.helpers import start_process as _start


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


def test_cli_load_counts_answers_and_fails_on_anything_but_200(
    served: tuple[str, subprocess.Popen[str]], tmp_path: Path, chelsea_jpeg: bytes
) -> None:
    url, _ = served
    photo = tmp_path / "chelsea.jpg"
    photo.write_bytes(chelsea_jpeg)
    ok = subprocess.run(
        [CLI, "load", str(photo), "--url", url, "--seconds", "2", "--concurrency", "2"],
        capture_output=True, text=True, env=_env(), timeout=60,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert re.fullmatch(r"\d+ requests in 2s \(200: \d+\)\n", ok.stdout), ok.stdout
    down = subprocess.run(
        [CLI, "load", str(photo), "--url", f"http://127.0.0.1:{_free_port()}", "--seconds", "1"],
        capture_output=True, text=True, env=_env(), timeout=60,
    )  # fmt: skip
    assert down.returncode == 1 and "ConnectError" in down.stdout


def test_cli_predict_remote_and_local_agree(
    served: tuple[str, subprocess.Popen[str]], demo_dir: Path, tmp_path: Path, chelsea_jpeg: bytes, coffee_jpeg: bytes
) -> None:
    url, _ = served
    folder = tmp_path / "photos"
    (folder / "nested").mkdir(parents=True)
    (folder / "chelsea.jpg").write_bytes(chelsea_jpeg)
    (folder / "nested" / "coffee.jpg").write_bytes(coffee_jpeg)
    # large enough for reduced-scale decoding: the CLI decodes as the server does, not at full scale
    big = Image.open(io.BytesIO(chelsea_jpeg)).resize((1804, 1200), Image.Resampling.BICUBIC)
    (folder / "nested" / "large.jpg").write_bytes(jpeg_bytes(big))
    (folder / "readme.md").write_text("not an image, skipped by extension")
    remote = subprocess.run([CLI, "predict", str(folder), "--url", url, "--format", "json", "--top-k", "3"],
                            capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=120)  # fmt: skip
    assert remote.returncode == 0, remote.stderr
    local = subprocess.run([CLI, "predict", str(folder), "--checkpoint", str(demo_dir), "--format", "json", "--top-k", "3"],
                           capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=120)  # fmt: skip
    assert local.returncode == 0, local.stderr
    remote_results, local_results = json.loads(remote.stdout), json.loads(local.stdout)
    assert [Path(r["path"]).name for r in remote_results] == ["chelsea.jpg", "coffee.jpg", "large.jpg"]
    for a, b in zip(remote_results, local_results, strict=True):  # one pipeline: the same scores
        assert [p["index"] for p in a["predictions"]] == [p["index"] for p in b["predictions"]]
        for x, y in zip(a["predictions"], b["predictions"], strict=True):
            assert x["score"] == pytest.approx(y["score"], abs=1e-5)
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


SECRET = "k3y-that-must-never-be-logged"


def test_uvicorn_import_string_serves_from_environment(demo_dir: Path, tmp_path: Path, chelsea_jpeg: bytes) -> None:
    """`uvicorn api.main:app` (what the Compose files run) reads API_* and serves."""
    port = _free_port()
    env = _env(API_CHECKPOINT_PATH=demo_dir, API_TOP_K=2, LOG_LEVEL="debug", API_API_KEY=SECRET)
    process = _start([str(BIN / "uvicorn"), "api.main:app", "--host", "127.0.0.1", "--port", str(port)], env, tmp_path)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(url, "/health/ready", timeout_s=120)
        body = httpx.post(url + "/api/v1/predict", files={"file": chelsea_jpeg}, headers={"X-API-Key": SECRET}).json()
        assert len(body["predictions"]) == 2
        model_info = httpx.get(url + "/api/v1/model", headers={"X-API-Key": SECRET}).json()
        process.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal so supervisors see why it stopped
        assert process.wait(timeout=30) in (0, -signal.SIGTERM)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)
    output = (tmp_path / "server.log").read_text()
    # JSON lines (uvicorn's own included): one start-up summary of the resolved configuration
    records = [json.loads(line) for line in output.splitlines() if line.strip()]
    ready = [r for r in records if r.get("event") == "ready"]
    assert len(ready) == 1 and ready[0]["message"].startswith("model ready: tf_efficientnet_lite0")
    assert ready[0]["num_classes"] == 1000 and ready[0]["device"] == "cpu"
    # the same description as GET /api/v1/model: runtime and precision, and why each
    info = model_info  # read before the stop
    assert info["runtime"] in ("torch", "openvino") and info["runtime_reason"].startswith("API_RUNTIME=auto")
    for field in ("architecture", "runtime", "precision", "runtime_reason", "checkpoint_path", "max_batch_size"):
        assert ready[0][field] == info[field], field
    assert ready[0]["max_queue"] > 0 and ready[0]["api_key"] == "set"
    assert SECRET not in output  # the key itself is never logged
    assert any(r["message"] == "Application shutdown complete." for r in records)
    access = [r for r in records if r.get("event") == "request" and r["path"] == "/api/v1/predict"]
    assert access[0]["status"] == 200 and access[0]["batch_size"] == 1


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


@pytest.mark.parametrize("fault", ["missing", "truncated", "wrong architecture", "wrong class count"])
def test_bad_checkpoint_exits_nonzero_with_one_clear_line(fault: str, tiny_checkpoint: Path, tmp_path: Path) -> None:
    path = tmp_path / "outputs" / "checkpoints" / "fold_0" / "best_model.pt"
    settings: dict[str, object] = {"API_MODEL_NAME": "test_resnet"}
    if fault != "missing":
        path.parent.mkdir(parents=True)
        data = tiny_checkpoint.read_bytes()
        path.write_bytes(data[: len(data) // 2] if fault == "truncated" else data)
    if fault == "wrong architecture":
        settings["API_MODEL_NAME"] = "resnet50"
    if fault == "wrong class count":
        settings["API_NUM_CLASSES"] = 67
    env = _env(API_CHECKPOINT_PATH=path, API_PORT=_free_port(), **settings)
    result = subprocess.run([CLI, "serve"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 3
    output = result.stdout + result.stderr
    errors = [json.loads(line)["message"] for line in output.splitlines() if "model load failed" in line]
    assert len(errors) == 1 and str(path) in errors[0], output[-2000:]
    expected = {
        "missing": "/app/models",  # where the checkpoint must be mounted in the container
        "truncated": "API_CHECKPOINT_PATH",
        "wrong architecture": "set API_MODEL_NAME",
        "wrong class count": "67",
    }[fault]
    assert expected in errors[0], errors[0]
    assert "Traceback" not in output


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
