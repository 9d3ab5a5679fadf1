"""Test helpers: real tiny timm models, real images, real servers on 127.0.0.1."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import timm
import torch
import uvicorn
from fastapi import FastAPI
from PIL import Image

from api.config import ModelSettings, Settings
from api.engine.classifier import Classifier
from api.engine.loader import load_classifier
from api.http.app import LoadPolicy, create_app

# ImageNet-1k indices 281..285: tabby, tiger cat, Persian cat, Siamese cat, Egyptian cat.
IMAGENET_CATS = set(range(281, 286))


def make_settings(**values: object) -> Settings:
    """Settings from arguments only: no .env file, no environment (see _clean_environment)."""
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def jpeg_bytes(image: Image.Image, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90, **options)
    return buffer.getvalue()


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def load_model(checkpoint: Path, **values: object) -> Classifier:
    """`load_classifier` on the CPU with PyTorch unless told otherwise, and no model cache."""
    values.setdefault("device", "cpu")
    values.setdefault("runtime", "torch")
    return load_classifier(ModelSettings(checkpoint_path=checkpoint, **values))  # type: ignore[arg-type]


def scores_of(classifier: Classifier, *images: Image.Image) -> torch.Tensor:
    """The serving path's scores for RGB images: prepare each (the decode pool's half), then forward."""
    return classifier.forward([classifier.prepare(image) for image in images])


def eager_scores(classifier: Classifier, normalised: torch.Tensor) -> torch.Tensor:
    """A PyTorch classifier's scores for an already normalised NCHW batch (timm's whole transform)."""
    with torch.inference_mode():
        return classifier.runtime.scores(normalised.to(memory_format=torch.channels_last))  # type: ignore[attr-defined]


def tiny_model(name: str = "test_resnet", num_classes: int = 5, seed: int = 0) -> torch.nn.Module:
    """A real timm architecture with random but reproducible weights."""
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, num_classes=num_classes).eval()


@contextmanager
def running_server(
    settings: Settings, *, wait_ready: bool = True, timeout_s: float = 60.0, app: FastAPI | None = None
) -> Iterator[str]:
    """Serve `create_app(settings)` (or `app`) with uvicorn on 127.0.0.1 in a thread; yield its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    app = app or create_app(settings, policy=LoadPolicy(exit_on_failure=False))
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(url, "/health/live" if not wait_ready else "/health", timeout_s=timeout_s)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


def eventually(check: Callable[[], bool], *, timeout_s: float = 10.0, what: str = "condition") -> None:
    """Poll `check` until it holds (work a server thread finishes after its response, e.g. a log line)."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not hold within {timeout_s}s")
        time.sleep(0.02)


def wait_for(
    url: str, path: str = "/health", *, timeout_s: float = 60.0, accept: Callable[[int], bool] | None = None
) -> None:
    """Poll until `path` answers 200 (readiness poll, not a sleep)."""
    accept = accept or (lambda status: status == 200)
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            response = httpx.get(url + path, timeout=2.0)
            if accept(response.status_code):
                return
            last = f"{response.status_code} {response.text[:200]}"
        except httpx.TransportError as error:
            last = repr(error)
        time.sleep(0.05)
    raise TimeoutError(f"{url}{path} not ready: {last}")


def noise_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode=mode)


def settled_health(url: str, *, timeout_s: float = 60.0) -> httpx.Response:
    """Poll /health until the loader has given its verdict (anything but "loading")."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        response = httpx.get(url + "/health", timeout=2.0)
        if response.json()["status"] != "loading":
            return response
        time.sleep(0.05)
    raise TimeoutError(f"{url} still loading after {timeout_s}s")


BIN = Path(sys.executable).parent
CLI = str(BIN / "cat-breeds-api")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def process_env(**values: object) -> dict[str, str]:
    """This environment without the developer's API_* / LOG_LEVEL, plus `values`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("API_") and k != "LOG_LEVEL"}
    env.update({k: str(v) for k, v in values.items()})
    return env


def start_process(command: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
    """Start a server whose output goes to cwd/server.log (a pipe nobody reads would fill and stall it)."""
    with (cwd / "server.log").open("w") as log:
        return subprocess.Popen(command, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, text=True)


def _tree(pid: int) -> list[int]:
    try:
        kids = [int(k) for k in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return [pid]
    return [pid] + [p for kid in kids for p in _tree(kid)]


class ServerProcess:
    """A service started as users start it (`cat-breeds-api serve`, gunicorn), as a separate process."""

    def __init__(self, command: list[str], cwd: Path, **env: object):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cwd = cwd
        self.process = start_process(command, process_env(API_PORT=self.port, **env), cwd)

    @property
    def pid(self) -> int:
        return self.process.pid

    def children(self) -> list[int]:
        return _tree(self.pid)[1:]

    def rss_mb(self) -> float:
        """Resident memory of the server and its children (workers), in MiB."""
        total = 0
        for pid in _tree(self.pid):
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            total += next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
        return total / 1024

    def log(self) -> str:
        return (self.cwd / "server.log").read_text()

    def records(self) -> list[dict]:
        """The JSON log lines (the default log format)."""
        return [json.loads(line) for line in self.log().splitlines() if line.startswith("{")]

    def wait_ready(self, timeout_s: float = 120) -> None:
        """Poll /health until 200; fail at once, with the log, if the server exits instead."""
        deadline = time.monotonic() + timeout_s
        while self.process.poll() is None:
            try:
                if httpx.get(self.url + "/health", timeout=2.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.url} not ready after {timeout_s}s:\n{self.log()[-3000:]}")
            time.sleep(0.05)
        raise AssertionError(f"server exited with {self.process.returncode}:\n{self.log()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)
            raise


@contextmanager
def served_process(command: list[str], cwd: Path, *, ready: bool = True, **env: object) -> Iterator[ServerProcess]:
    server = ServerProcess(command, cwd, **env)
    try:
        if ready:
            server.wait_ready()
        yield server
    finally:
        if server.process.poll() is None:
            server.process.kill()
        server.process.wait(timeout=30)
