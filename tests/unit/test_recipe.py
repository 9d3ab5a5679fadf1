"""The torch-free recipe a front-end runs equals timm's own eval transform, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
from PIL import Image
from timm.data import create_transform

from api.engine.images.recipe import Recipe
from api.engine.model.preprocess import split_transform

PHOTOS = {
    "chelsea": skimage.data.chelsea(),  # 451 x 300
    "astronaut": skimage.data.astronaut(),  # 512 x 512
    "coffee": skimage.data.coffee(),  # 600 x 400
    "rocket": skimage.data.rocket(),  # 427 x 640: portrait
}
SHAPES = [  # sizes that scale up, scale down and need padding
    None,
    (180, 120),
    (100, 300),
    (1600, 1066),
]
CONFIGS = {
    "center bicubic crop_pct 0.875": {"crop_pct": 0.875, "interpolation": "bicubic"},
    "squash (crop_pct 1.0)": {"crop_pct": 1.0, "interpolation": "bilinear"},
    "border (keep ratio, pad)": {"crop_pct": 0.95, "crop_mode": "border", "interpolation": "bicubic"},
    "non-square center": {"crop_pct": 0.9, "interpolation": "bilinear", "input_size": (3, 192, 256)},
}


def _timm_pil_steps(config: dict) -> tuple[list, Recipe]:
    kwargs = {"input_size": (3, 224, 224), "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), **config}
    transform = create_transform(**kwargs, is_training=False)
    recipe = split_transform(transform)
    assert recipe is not None
    return transform.transforms[:-2], recipe


@pytest.mark.parametrize("config", list(CONFIGS), ids=list(CONFIGS))
def test_recipe_equals_timm_bit_for_bit(config: str) -> None:
    steps, recipe = _timm_pil_steps(CONFIGS[config])
    recipe = Recipe.from_dict(recipe.to_dict())  # as a front-end receives it
    for name, array in PHOTOS.items():
        for shape in SHAPES:
            image = Image.fromarray(array)
            if shape is not None:
                image = image.resize(shape, Image.Resampling.BILINEAR)
            expected = image
            for step in steps:
                expected = step(expected)
            np.testing.assert_array_equal(recipe.pixels(image), np.asarray(expected), err_msg=f"{name} {shape}")


def test_recipe_modules_need_no_torch() -> None:
    import subprocess
    import sys

    code = "import api.engine.images.recipe, api.engine.images.decode, sys; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
