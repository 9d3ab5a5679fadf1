"""Every client command takes the API key the way the server does: --api-key, API_API_KEY, API_API_KEY_FILE."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import CLI, make_settings, process_env, running_server

KEY = "kitten-" + "x" * 24


@pytest.fixture(scope="module")
def keyed_server(tiny_checkpoint: Path) -> Iterator[str]:
    settings = make_settings(checkpoint_path=tiny_checkpoint, model_name="test_resnet", api_key=KEY)
    with running_server(settings) as url:
        yield url


@pytest.fixture
def photo(tmp_path: Path, chelsea_jpeg: bytes) -> Path:
    path = tmp_path / "chelsea.jpg"
    path.write_bytes(chelsea_jpeg)
    return path


def _run(command: list[str], cwd: Path, **env: object) -> subprocess.CompletedProcess[str]:
    # cwd is a fresh folder: no .env of the developer's is read
    return subprocess.run(command, cwd=cwd, env=process_env(**env), capture_output=True, text=True, timeout=120)


def _ways(tmp_path: Path) -> dict[str, tuple[list[str], dict[str, object]]]:
    key_file = tmp_path / "api-key"
    key_file.write_text(KEY + "\n")  # as a mounted secret: trailing newline
    return {
        "flag": (["--api-key", KEY], {}),
        "environment": ([], {"API_API_KEY": KEY}),
        "key file": ([], {"API_API_KEY_FILE": key_file}),
    }


@pytest.mark.parametrize("way", ["flag", "environment", "key file"])
def test_predict_url_sends_the_key(keyed_server: str, photo: Path, tmp_path: Path, way: str) -> None:
    extra, env = _ways(tmp_path)[way]
    result = _run([CLI, "predict", str(photo), "--url", keyed_server, "--format", "json", *extra], tmp_path, **env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)[0]["predictions"]


@pytest.mark.parametrize("way", ["flag", "environment", "key file"])
def test_load_sends_the_key(keyed_server: str, photo: Path, tmp_path: Path, way: str) -> None:
    extra, env = _ways(tmp_path)[way]
    command = [CLI, "load", str(photo), "--url", keyed_server, "--seconds", "1", "--concurrency", "1", *extra]
    result = _run(command, tmp_path, **env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "(200: " in result.stdout and "401" not in result.stdout


@pytest.mark.parametrize("command", ["predict", "load"])
@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_without_the_key_one_clear_line_and_a_failure(
    keyed_server: str, photo: Path, tmp_path: Path, command: str, key: str | None
) -> None:
    args = [CLI, command, str(photo), "--url", keyed_server]
    if command == "load":
        args += ["--seconds", "30"]  # refused by the first request, not after the whole run
    if key:
        args += ["--api-key", key]
    result = _run(args, tmp_path)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "401" in lines[0] and "--api-key" in lines[0] and "API_API_KEY_FILE" in lines[0]
    assert ("refused the API key" if key else "requires an API key") in lines[0]
    assert KEY not in result.stderr + result.stdout
