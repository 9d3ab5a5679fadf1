"""The Compose preflight: each check says what is wrong and how to fix it, in one line."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from api.ops.doctor import check_cpus, check_models, check_port, load_env


def _env(project: Path, text: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for name in ("MODELS_DIR", "CPU_LIMIT", "CPU_RESERVATION", "PWD"):
        monkeypatch.delenv(name, raising=False)
    (project / ".env").write_text(text)
    return load_env(project)


def test_models_folder_and_checkpoint_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    models = tmp_path / "ckpt"
    models.mkdir()
    env = _env(tmp_path, f"MODELS_DIR={models}\nAPI_CHECKPOINT_PATH=/app/models/best_model.pt\n", monkeypatch)
    levels = [(c.name, c.level) for c in check_models(env, tmp_path)]
    assert levels == [("models", "ok"), ("checkpoint", "fail")]
    (models / "best_model.pt").write_bytes(b"x")
    assert [c.level for c in check_models(env, tmp_path)] == ["ok", "ok"]


def test_missing_models_folder_names_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = _env(tmp_path, f"MODELS_DIR={tmp_path / 'nope'}\n", monkeypatch)
    (check,) = check_models(env, tmp_path)
    assert check.level == "fail" and str(tmp_path / "nope") in check.message and "MODELS_DIR" in check.message


def test_default_models_folder_is_the_seeds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = _env(tmp_path, "", monkeypatch)
    (check,) = check_models(env, tmp_path)
    assert str(tmp_path / "outputs" / "checkpoints" / "fold_0") in check.message


def test_checkpoint_outside_the_mount(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = _env(tmp_path, f"MODELS_DIR={tmp_path}\nAPI_CHECKPOINT_PATH=outputs/best.pt\n", monkeypatch)
    checks = list(check_models(env, tmp_path))
    assert checks[-1].level == "fail" and "/app/models/<file>" in checks[-1].message


def test_cpu_limit_beyond_the_host_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    too_many = (os.cpu_count() or 1) + 1
    env = _env(tmp_path, f"CPU_LIMIT={too_many}\n", monkeypatch)
    (check,) = check_cpus(env)
    assert check.level == "fail" and f"CPU_LIMIT={float(too_many)}" in check.message
    fits = _env(tmp_path, "CPU_LIMIT=1.0\nCPU_RESERVATION=0.5\n", monkeypatch)
    assert [c.level for c in check_cpus(fits)] == ["ok"]


def test_port_in_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = _env(tmp_path, f"API_PORT={port}\n", monkeypatch)
        (check,) = check_port(env)
        assert check.level == "fail" and f"127.0.0.1:{port} is in use" in check.message
