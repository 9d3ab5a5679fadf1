"""The container tier: the real image and Compose files on a real Docker engine.

Skips itself (with the reason) when no engine is reachable, unless REQUIRE_DOCKER=1 (CI), where a
missing engine is a failure. Everything it builds carries a per-run tag and is removed after.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from api.ops.demo import write_demo_model
from tests.support import free_port

ROOT = Path(__file__).resolve().parents[2]
BASE = ["docker-compose.yml", "docker-compose.cpu.yml"]
RUN_ID = uuid.uuid4().hex[:10]


def _engine_problem() -> str | None:
    if shutil.which("docker") is None:
        return "no docker CLI on PATH"
    info = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True)
    if info.returncode != 0:
        return f"no Docker engine reachable: {info.stderr.strip()[:200]}"
    compose = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
    if compose.returncode != 0:
        return "the docker compose v2 plugin is missing (scripts/ci-docker-setup.sh links it)"
    return None


@pytest.fixture(scope="session")
def engine() -> None:
    problem = _engine_problem()
    if problem:
        if os.environ.get("REQUIRE_DOCKER") == "1":
            pytest.fail(f"container tier required (REQUIRE_DOCKER=1) but {problem}")
        pytest.skip(f"container tier skipped: {problem}")


def _public_dir(prefix: str) -> Path:
    """A temp folder the container's non-root user can read (pytest's tmp dirs are 0700)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


@dataclass
class Stack:
    """One Compose project (unique name) over the repository's files plus per-test settings."""

    name: str
    files: list[str]
    env: dict[str, str]
    workdir: Path
    project_dir: Path = ROOT
    extra: list[Path] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.env['API_PORT']}"

    def compose(
        self, *args: str, check: bool = True, timeout: float = 600, wrapper: list[str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        env_file = self.workdir / f"{self.name}.env"
        env_file.write_text("".join(f"{k}={v}\n" for k, v in self.env.items()))
        command = ["docker", "compose", "-p", self.name, "--project-directory", str(self.project_dir)]
        command += ["--env-file", str(env_file)]
        for name in self.files:
            command += ["-f", str(ROOT / name)]
        for path in self.extra:
            command += ["-f", str(path)]
        clean_env = {k: v for k, v in os.environ.items() if not k.startswith("API_")}
        clean_env.pop("CONTAINER_NAME", None)
        result = subprocess.run(
            [*(wrapper or []), *command, *args], capture_output=True, text=True, env=clean_env, timeout=timeout
        )
        if check and result.returncode != 0:
            raise AssertionError(f"docker compose {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result

    def container(self) -> str:
        return self.compose("ps", "-a", "-q", "cat-breeds-api").stdout.split()[0]

    def inspect(self) -> dict:
        out = subprocess.run(["docker", "inspect", self.container()], capture_output=True, text=True, check=True)
        return json.loads(out.stdout)[0]

    def exec(self, *command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.compose("exec", "-T", "cat-breeds-api", *command, check=check)

    def wait_healthy(self, timeout_s: float = 180) -> float:
        """Seconds until Docker reports the container healthy (a poll of its health state)."""
        started = time.monotonic()
        last = "?"
        while time.monotonic() - started < timeout_s:
            try:
                state = self.inspect()["State"]
            except (subprocess.CalledProcessError, IndexError):
                time.sleep(0.5)
                continue
            last = f"{state['Status']} / {state.get('Health', {}).get('Status')}"
            if state.get("Health", {}).get("Status") == "healthy":
                return time.monotonic() - started
            time.sleep(0.5)
        logs = self.compose("logs", "--no-color", "--tail", "60", check=False).stdout
        raise AssertionError(f"not healthy after {timeout_s}s ({last}); logs:\n{logs}")

    def up(self, *args: str) -> float:
        started = time.monotonic()
        self.compose("up", "-d", "--no-build", *args)
        return time.monotonic() - started

    def down(self) -> None:
        self.compose("down", "-v", "--remove-orphans", "--timeout", "10", check=False)

    def get(self, path: str, **kwargs: object) -> httpx.Response:
        return httpx.get(self.url + path, timeout=30, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def workdir() -> Iterator[Path]:
    path = _public_dir("cbt-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def models_dir(workdir: Path) -> Path:
    """A host models folder holding a real checkpoint (the demo model, a timm model folder)."""
    folder = write_demo_model(workdir / "models")
    folder.chmod(0o755)
    for file in folder.iterdir():
        file.chmod(0o644)
    return folder


def _base_env(models: Path) -> dict[str, str]:
    cpus = min(os.cpu_count() or 1, 4)
    return {
        "IMAGE_TAG": f"test-{RUN_ID}",
        "BASE_IMAGE": os.environ.get("CAT_BREEDS_BASE_IMAGE", "python:3.11-slim-bookworm"),
        "MODELS_DIR": str(models),
        # the demo folder records its own architecture, classes and input size: nothing else is set
        "API_CHECKPOINT_PATH": "/app/models",
        "API_PORT": str(free_port()),
        # a 2-CPU host refuses the default cpus: 4 limit, as a user's small machine would
        "CPU_LIMIT": f"{cpus:.1f}",
        "CPU_RESERVATION": f"{cpus / 2:.1f}",
        "HEALTHCHECK_INTERVAL": "2s",
    }


@pytest.fixture(scope="session")
def no_fixed_name(workdir: Path) -> Path:
    """Test projects must not take the fixed container name a user's own stack uses."""
    path = workdir / "compose.test.yml"
    path.write_text("services:\n  cat-breeds-api:\n    container_name: !reset null\n")
    return path


@pytest.fixture(scope="session")
def images(engine: None, models_dir: Path, workdir: Path, no_fixed_name: Path) -> Iterator[dict[str, float]]:
    """Build the image once through Compose (as users do); remove it afterwards."""
    env = _base_env(models_dir)
    timings: dict[str, float] = {}
    stack = Stack(f"cbt{RUN_ID}build", BASE, env, workdir, extra=[no_fixed_name])
    try:
        started = time.monotonic()
        # as `make docker-build` does: wheels in docker/wheelhouse are served to the build on loopback
        stack.compose("build", timeout=1800, wrapper=[sys.executable, str(ROOT / "scripts" / "with_wheelhouse.py")])
        timings["build_s"] = time.monotonic() - started
        yield timings
    finally:
        subprocess.run(["docker", "rmi", "-f", f"cat-breeds-api:test-{RUN_ID}"], capture_output=True)


@pytest.fixture(scope="session")
def make_stack(images: dict[str, float], models_dir: Path, workdir: Path, no_fixed_name: Path) -> Iterator:
    stacks: list[Stack] = []

    def make(suffix: str, files: list[str] | None = None, **env: str) -> Stack:
        stack = Stack(
            f"cbt{RUN_ID}{suffix}", files or BASE, {**_base_env(models_dir), **env}, workdir, extra=[no_fixed_name]
        )
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.down()
