"""Shared fixtures: real tiny timm models, real photos, real servers on 127.0.0.1."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import skimage.data
import torch
from PIL import Image

from api.ops.demo import write_demo_eval, write_demo_model
from tests.digits import Digits, train_folds
from tests.helpers import jpeg_bytes, make_settings, running_server, tiny_model

TIERS = ("unit", "integration", "api", "e2e", "reliability", "browser", "deploy", "container", "gpu")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Each test is marked with its tier, its folder: `pytest -m unit` is the fast default tier (tiny
    models only); `-m "not container"` and so on select the others."""
    for item in items:
        parts = Path(str(item.fspath)).parts
        tier = next((part for part in reversed(parts) if part in TIERS), None)
        if tier is not None:
            item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture(scope="session")
def model_cache_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One XDG cache home for the session: the model cache (converted models, runtime choices) of every
    server the tests start lives here, never in the developer's ~/.cache."""
    return tmp_path_factory.mktemp("xdg-cache")


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch, model_cache_home: Path) -> None:
    """No API_* or LOG_LEVEL from the developer's shell leaks into a test."""
    for name in list(os.environ):
        if name.startswith("API_") or name == "LOG_LEVEL":
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CACHE_HOME", str(model_cache_home))


@pytest.fixture(scope="session")
def chelsea() -> Image.Image:
    """skimage's photo of Chelsea the cat, 451x300."""
    return Image.fromarray(skimage.data.chelsea())


@pytest.fixture(scope="session")
def chelsea_jpeg(chelsea: Image.Image) -> bytes:
    return jpeg_bytes(chelsea)


@pytest.fixture(scope="session")
def coffee_jpeg() -> bytes:
    """A second real photo (a cup of coffee), 600x400."""
    return jpeg_bytes(Image.fromarray(skimage.data.coffee()))


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded demo model (real ImageNet weights), written as users' `make run` writes it."""
    return write_demo_model(tmp_path_factory.mktemp("demo") / "demo")


@pytest.fixture(scope="session")
def demo_eval_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's evaluation folder as `make run` writes it: 360 crops of scikit-image's photos, unlabeled."""
    return write_demo_eval(tmp_path_factory.mktemp("demo-eval") / "eval")


@pytest.fixture(scope="session")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Digits:
    """A 3-fold resnet10t trained on scikit-learn's handwritten digits (about 30 s), and 360 held-out
    digits no fold saw, in class subfolders (tests/digits.py)."""
    return train_folds(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 5-class test_resnet checkpoint in the common training-loop format, with a labels file."""
    folder = tmp_path_factory.mktemp("tiny")
    model = tiny_model()
    torch.save({"epoch": 3, "model_state_dict": model.state_dict()}, folder / "best_model.pt")
    (folder / "classes.txt").write_text("abyssinian\nbengal\nbirman\nbombay\npersian\n")
    return folder / "best_model.pt"


@pytest.fixture(scope="session")
def four_class_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-class test_resnet state_dict with its class names (a, b, c, d)."""
    path = tmp_path_factory.mktemp("four") / "multi.pt"
    torch.save({"state_dict": tiny_model(num_classes=4).state_dict(), "class_names": ["a", "b", "c", "d"]}, path)
    return path


@pytest.fixture(scope="module")
def tiny_server(tiny_checkpoint: Path) -> Iterator[str]:
    """A real server for a tiny 5-class model, shared by a test module. PyTorch fp32, as the direct
    calls it is compared with (auto would time the runtimes and might pick OpenVINO, 1e-4 apart)."""
    settings = make_settings(
        checkpoint_path=tiny_checkpoint,
        model_name="test_resnet",
        max_upload_mb=1,
        max_batch_files=4,
        runtime="torch",
        precision="fp32",
    )
    with running_server(settings) as url:
        yield url


@pytest.fixture(scope="session")
def demo_server(demo_dir: Path) -> Iterator[str]:
    """A real server for the demo model (real ImageNet weights)."""
    with running_server(make_settings(checkpoint_path=demo_dir)) as url:
        yield url
