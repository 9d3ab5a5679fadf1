"""Test helpers: real tiny timm models, real images, real servers on 127.0.0.1."""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx
import numpy as np
import timm
import torch
import uvicorn
from PIL import Image

from api.config import Settings
from api.main import create_app

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


def tiny_model(name: str = "test_resnet", num_classes: int = 5, seed: int = 0) -> torch.nn.Module:
    """A real timm architecture with random but reproducible weights."""
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, num_classes=num_classes).eval()


@contextmanager
def running_server(settings: Settings, *, wait_ready: bool = True, timeout_s: float = 60.0) -> Iterator[str]:
    """Serve `create_app(settings)` with uvicorn on 127.0.0.1 in a thread; yield its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    app = create_app(settings, exit_on_load_failure=False)
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
