"""Preflight for the Docker Compose deployment: one clear line per check, before `docker compose up`.

Checks Docker and Compose, the NVIDIA runtime and driver against the image's CUDA build, the models
folder and checkpoint that `.env` names, the host port and the CPU limit. Reads `.env` the way
Compose does (environment first, then the file, then the Compose file's defaults).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from dotenv import dotenv_values

Level = Literal["ok", "warn", "fail"]

# Minimum NVIDIA driver per CUDA flavour of the image (CUDA minor-version compatibility floors).
CUDA_DRIVER_FLOOR = {"13.0": (580, 65), "12.8": (570, 26), "12.6": (560, 28), "12.4": (550, 54), "11.8": (520, 61)}
IMAGE_CUDA_DEFAULT = "13.0"  # torch==2.14.1 from PyPI
CONTAINER_MODELS = "/app/models"


@dataclass(frozen=True)
class Check:
    level: Level
    name: str
    message: str

    def line(self) -> str:
        return f"[{self.level.upper():4}] {self.name}: {self.message}"


def _run(*command: str) -> subprocess.CompletedProcess[str] | None:
    if shutil.which(command[0]) is None:
        return None
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None


def load_env(project: Path, env_file: Path | None = None) -> dict[str, str]:
    """The variables Compose would interpolate: process environment over the .env file."""
    path = env_file or project / ".env"
    values = {k: v or "" for k, v in dotenv_values(path).items()} if path.is_file() else {}
    values.update(os.environ)
    return values


def check_docker() -> Iterator[Check]:
    version = _run("docker", "version", "--format", "{{.Server.Version}}")
    if version is None:
        yield Check("fail", "docker", "the docker CLI is not installed: https://docs.docker.com/engine/install/")
        return
    if version.returncode != 0:
        reason = (version.stderr.strip().splitlines() or ["no answer"])[-1]
        yield Check("fail", "docker", f"the Docker engine is not reachable ({reason}); start it or check permissions")
        return
    server = version.stdout.strip()
    major = int(re.match(r"\d+", server).group()) if re.match(r"\d+", server) else 0  # type: ignore[union-attr]
    level: Level = "ok" if major >= 25 else "warn"
    note = "" if major >= 25 else " (< 25: healthcheck start_interval is ignored; healthy is reported after 30 s)"
    yield Check(level, "docker", f"engine {server}{note}")
    compose = _run("docker", "compose", "version", "--short")
    if compose is None or compose.returncode != 0:
        yield Check("fail", "compose", "Docker Compose v2 is missing: install the docker-compose-plugin package")
    else:
        short = compose.stdout.strip().lstrip("v")
        ok = tuple(int(x) for x in re.findall(r"\d+", short)[:2]) >= (2, 24)
        yield Check("ok" if ok else "fail", "compose", f"{short}" + ("" if ok else " (need >= 2.24 for !reset)"))


def _driver_version() -> tuple[int, int] | None:
    smi = _run("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader")
    if smi is None or smi.returncode != 0 or not smi.stdout.strip():
        return None
    numbers = re.findall(r"\d+", smi.stdout.splitlines()[0])
    return (int(numbers[0]), int(numbers[1])) if len(numbers) >= 2 else None


def check_gpu(env: dict[str, str]) -> Iterator[Check]:
    cuda = env.get("IMAGE_CUDA", IMAGE_CUDA_DEFAULT)
    if "/cpu" in env.get("TORCH_INDEX_URL", ""):
        yield Check("ok", "gpu", "CPU build of torch (TORCH_INDEX_URL): no GPU needed; use docker-compose.cpu.yml")
        return
    driver = _driver_version()
    info = _run("docker", "info", "--format", "{{json .Runtimes}}")
    runtimes = json.loads(info.stdout) if info and info.returncode == 0 and info.stdout.strip() else {}
    if driver is None:
        yield Check(
            "warn", "gpu", "no NVIDIA driver (nvidia-smi): on this host use docker-compose.cpu.yml (API_DEVICE=cpu)"
        )
        return
    floor = CUDA_DRIVER_FLOOR.get(cuda)
    if floor and driver < floor:
        yield Check(
            "fail",
            "driver",
            f"NVIDIA driver {driver[0]}.{driver[1]} is older than {floor[0]}.{floor[1]}, which the image's CUDA {cuda} "
            "build needs; upgrade the driver or build with TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126",
        )
    else:
        yield Check("ok", "driver", f"NVIDIA driver {driver[0]}.{driver[1]} (CUDA {cuda} build needs {floor})")
    if "nvidia" in runtimes:
        yield Check("ok", "nvidia-runtime", "registered with Docker")
    else:
        yield Check(
            "fail",
            "nvidia-runtime",
            "the NVIDIA Container Toolkit is not registered with Docker: run "
            "scripts/install-nvidia-container-toolkit.sh (or use docker-compose.cpu.yml)",
        )


def check_models(env: dict[str, str], project: Path) -> Iterator[Check]:
    pwd = env.get("PWD", str(project))
    models = Path(env.get("MODELS_DIR") or f"{pwd}/outputs/checkpoints/fold_0")
    if not models.is_dir():
        yield Check(
            "fail", "models", f"MODELS_DIR={models} does not exist; create it or set MODELS_DIR in .env to the folder "
            "holding your checkpoint (it is mounted read-only at /app/models)",
        )  # fmt: skip
        return
    yield Check("ok", "models", f"MODELS_DIR={models}")
    inside = env.get("API_CHECKPOINT_PATH") or f"{CONTAINER_MODELS}/best_model.pt"
    if not inside.startswith(CONTAINER_MODELS):
        yield Check(
            "fail", "checkpoint", f"API_CHECKPOINT_PATH={inside} is outside {CONTAINER_MODELS}, where MODELS_DIR is "
            f"mounted; use {CONTAINER_MODELS}/<file>",
        )  # fmt: skip
        return
    on_host = models / inside.removeprefix(CONTAINER_MODELS).lstrip("/")
    if on_host.exists():
        yield Check("ok", "checkpoint", f"API_CHECKPOINT_PATH={inside} -> {on_host}")
    else:
        yield Check(
            "fail", "checkpoint", f"API_CHECKPOINT_PATH={inside} maps to {on_host}, which does not exist; put the "
            "checkpoint there or fix API_CHECKPOINT_PATH",
        )  # fmt: skip


def check_port(env: dict[str, str]) -> Iterator[Check]:
    port = int(env.get("API_PORT") or 8000)
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            yield Check("fail", "port", f"127.0.0.1:{port} is in use; stop what holds it or set API_PORT in .env")
            return
    yield Check("ok", "port", f"127.0.0.1:{port} is free")


def check_cpus(env: dict[str, str]) -> Iterator[Check]:
    host = os.cpu_count() or 1
    for name, default in (("CPU_LIMIT", 4.0), ("CPU_RESERVATION", 2.0)):
        value = float(env.get(name) or default)
        if value > host:
            yield Check(
                "fail", "cpus", f"{name}={value} but this host has {host} CPUs: Docker refuses the container; "
                f"set {name}={float(host)} (or less) in .env",
            )  # fmt: skip
            return
    yield Check("ok", "cpus", f"limits fit the host's {host} CPUs")


def run_checks(project: Path, env_file: Path | None = None) -> list[Check]:
    env = load_env(project, env_file)
    results: list[Check] = []
    results += check_docker()
    results += check_gpu(env)
    results += check_models(env, project)
    results += check_port(env)
    results += check_cpus(env)
    return results
