"""Test helpers: real tiny timm models, real images, real servers on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import io
import socket
import threading
import time
from collections.abc import Iterator
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
from api.engine.model.classifier import Classifier
from api.engine.model.loader import load_classifier
from api.http.app import LoadPolicy, create_app
from tests.support import (  # noqa: F401 (re-exported: the tests' one import for helpers)
    BIN,
    CLI,
    ServerProcess,
    eventually,
    free_port,
    process_env,
    served_process,
    start_process,
    wait_for,
)

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
    values.setdefault("precision", "fp32")  # exact comparisons: auto picks bf16 on an AMX/AVX512-BF16 host
    values.setdefault("cache_dir", None)
    return load_classifier(model_settings(checkpoint, **values))


def model_settings(checkpoint: Path | None, **values: object) -> ModelSettings:
    """The model group as the service builds it from its settings' defaults, with `values` set."""
    group = Settings(_env_file=None, checkpoint_path=checkpoint).model_group  # type: ignore[call-arg]
    return dataclasses.replace(group, **values)  # type: ignore[arg-type]


def architecture_checkpoint(architecture: str, folder: Path, num_classes: int = 67) -> Path:
    """A timm `architecture` with random weights (seed 0), saved as a training run would save it."""
    torch.manual_seed(0)
    model = timm.create_model(architecture, pretrained=False, num_classes=num_classes).eval()
    path = folder / "best_model.pt"
    torch.save({"architecture": architecture, "state_dict": model.state_dict()}, path)
    return path


def scores_of(classifier: Classifier, *images: Image.Image) -> torch.Tensor:
    """The serving path's scores for RGB images: prepare each (the decode pool's half), then forward."""
    return classifier.forward([classifier.prepare(image) for image in images])


def random_pixels(classifier: Classifier, count: int, seed: int = 0) -> list[np.ndarray]:
    """Random prepared images (H x W x 3 uint8 at the model's input size), as the decode pool hands them over."""
    _, height, width = classifier.input_size
    rng = np.random.default_rng(seed)
    return list(rng.integers(0, 256, (count, height, width, 3), dtype=np.uint8))


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
