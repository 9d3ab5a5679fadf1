"""The two resizes that are not Pillow's agree with the exact PIL path on real photos: top-1 >= 99.5 %
and max |probability difference| <= 0.02, for resnet50, efficientnet_b3 and convnext_base (and the
demo's real ImageNet weights):
- the engine-side resize + crop (api/engine/images/device_resize.py: API_PREPROCESS=auto, the default,
  on a CPU engine and a GPU one); runs here on the CPU, in the 8-bit kernels a CPU engine serves with
  (torch's CUDA kernels implement the same filter in float);
- the front-ends' fast path (api/engine/images/fast_resize.py, only the crop's region resampled:
  API_RESIZE=fast, what API_PREPROCESS=frontend runs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from api.engine.images import fast_resize
from api.engine.images.device_resize import resize_crop
from api.engine.images.recipe import Recipe
from tests.helpers import architecture_checkpoint, load_model

PHOTOS = ["chelsea", "coffee", "astronaut", "cat", "rocket", "immunohistochemistry", "retina", "hubble_deep_field"]
SCALES = (0.5, 0.8, 1.0, 1.3)  # below, at and above the resize target, as reduced-scale decoding leaves them
LARGE = 3.0  # and a shrink by more than 3x, as a big PNG or WebP arrives (the fast path reduces it first)
WAYS = ("device", "fast")


def _images() -> list[np.ndarray]:
    images = []
    for name in PHOTOS:
        photo = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        for scale in (*SCALES, LARGE):
            size = (max(1, round(photo.width * scale)), max(1, round(photo.height * scale)))
            images.append(np.asarray(photo.resize(size, Image.Resampling.LANCZOS)))
    return images


def _fast(chunk: list[np.ndarray], recipe: Recipe) -> np.ndarray:
    assert all(fast_resize.covers(recipe, a.shape[1], a.shape[0]) for a in chunk)  # none falls back to exact
    return np.stack([fast_resize.resize_crop(Image.fromarray(a), recipe) for a in chunk])


def _agreement(path: Path, way: str) -> tuple[float, float]:
    classifier = load_model(path, runtime="torch", precision="fp32")
    recipe = classifier.split
    agree, worst, total = 0, 0.0, 0
    images = _images()
    for start in range(0, len(images), 8):
        chunk = images[start : start + 8]
        exact = classifier.runtime.forward(np.stack([recipe.pixels(Image.fromarray(a)) for a in chunk]))
        # the device way gets them uncropped (the engine resizes them); the fast way as a front-end sends them
        on_device = classifier.forward(chunk) if way == "device" else classifier.runtime.forward(_fast(chunk, recipe))
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


def test_fast_resize_is_pil_to_rounding(demo_dir: Path) -> None:
    recipe = load_model(demo_dir, runtime="torch", precision="fp32").split
    for array in _images():
        exact = recipe.pixels(Image.fromarray(array)).astype(int)
        ours = _fast([array], recipe)[0].astype(int)
        assert ours.shape == exact.shape
        # to rounding where only the region differs; the box-filter pre-reduction of a big shrink adds a little
        resized_w, resized_h = recipe.resized_size(array.shape[1], array.shape[0])
        reduced = min(array.shape[1] / resized_w, array.shape[0] / resized_h) >= fast_resize.REDUCING_GAP
        assert np.abs(ours - exact).max() <= (3 if reduced else 1)
        assert np.abs(ours - exact).mean() < 0.5, np.abs(ours - exact).mean()


@pytest.mark.parametrize("way", WAYS)
def test_real_weights_agree(demo_dir: Path, way: str) -> None:
    top1, worst = _agreement(demo_dir, way)
    print(f"\n{way}: demo (efficientnet-lite0, ImageNet weights): top-1 agreement {top1:.3f}, max |dp| {worst:.4f}")
    assert top1 >= 0.995 and worst <= 0.02


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("architecture", ["resnet50", "efficientnet_b3", "convnext_base"])
def test_architectures_agree(architecture: str, way: str, tmp_path: Path) -> None:
    path = architecture_checkpoint(architecture, tmp_path)
    top1, worst = _agreement(path, way)
    print(f"\n{way}: {architecture}: top-1 agreement {top1:.3f}, max |dp| {worst:.4f}")
    assert top1 >= 0.995 and worst <= 0.02
