"""The engine-side resize + crop (api/engine/images/device_resize.py, what a GPU engine runs) agrees with the
exact PIL path on real photos: top-1 >= 99.5 % and max |probability difference| <= 0.02, for
resnet50, efficientnet_b3 and convnext_base (and the demo's real ImageNet weights). Runs on the CPU:
torch's CPU and CUDA antialiased kernels implement the same filter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from api.engine.images.device_resize import resize_crop
from tests.helpers import architecture_checkpoint, load_model

PHOTOS = ["chelsea", "coffee", "astronaut", "cat", "rocket", "immunohistochemistry", "retina", "hubble_deep_field"]
SCALES = (0.5, 0.8, 1.0, 1.3)  # below, at and above the resize target, as reduced-scale decoding leaves them


def _images() -> list[np.ndarray]:
    images = []
    for name in PHOTOS:
        photo = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        for scale in SCALES:
            size = (max(1, round(photo.width * scale)), max(1, round(photo.height * scale)))
            images.append(np.asarray(photo.resize(size, Image.Resampling.LANCZOS)))
    return images


def _agreement(path: Path) -> tuple[float, float]:
    classifier = load_model(path, runtime="torch", precision="fp32")
    recipe = classifier.split
    agree, worst, total = 0, 0.0, 0
    images = _images()
    for start in range(0, len(images), 8):
        chunk = images[start : start + 8]
        exact = classifier.runtime.forward(np.stack([recipe.pixels(Image.fromarray(a)) for a in chunk]))
        on_device = classifier.forward(chunk)  # not cropped yet: resized in the engine's way
        agree += int((exact.argmax(-1) == on_device.argmax(-1)).sum())
        worst = max(worst, float((exact - on_device).abs().max()))
        total += len(chunk)
    return agree / total, worst


def test_resize_crop_is_close_to_pil_pixel_for_pixel(demo_dir: Path) -> None:
    classifier = load_model(demo_dir, runtime="torch", precision="fp32")
    for array in _images()[:8]:
        exact = classifier.split.pixels(Image.fromarray(array)).astype(int)
        ours = resize_crop([array], classifier.split, torch.device("cpu"))[0].numpy().astype(int)
        assert ours.shape == exact.shape
        assert np.abs(ours - exact).mean() < 1.5, np.abs(ours - exact).mean()


def test_real_weights_agree(demo_dir: Path) -> None:
    top1, worst = _agreement(demo_dir)
    print(f"\ndemo (efficientnet-lite0, ImageNet weights): top-1 agreement {top1:.3f}, max |dp| {worst:.4f}")
    assert top1 >= 0.995 and worst <= 0.02


@pytest.mark.parametrize("architecture", ["resnet50", "efficientnet_b3", "convnext_base"])
def test_architectures_agree(architecture: str, tmp_path: Path) -> None:
    path = architecture_checkpoint(architecture, tmp_path)
    top1, worst = _agreement(path)
    print(f"\n{architecture}: top-1 agreement {top1:.3f}, max |dp| {worst:.4f}")
    assert top1 >= 0.995 and worst <= 0.02
