"""timm's eval transform, read once at load time and turned into a `Recipe` (api/engine/images/recipe.py).

The recipe is the PIL half (resize + crop: a front-end process runs it without torch); to-tensor and
normalisation run once per batch in the runtime. Decoding lives in `api.engine.images.decode`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from PIL import Image
from timm.data import create_transform, resolve_model_data_config
from timm.data.transforms import CenterCropOrPad, MaybeToTensor, ResizeKeepRatio
from torchvision.transforms import CenterCrop, InterpolationMode, Normalize, Resize, ToTensor
from torchvision.transforms.functional import pil_modes_mapping

from api.engine.images.recipe import Recipe
from api.errors import ConfigError


def _recipe(steps: list[Any], mean: tuple[float, ...], std: tuple[float, ...]) -> Recipe | None:
    if len(steps) != 2 or not isinstance(steps[1], CenterCrop | CenterCropOrPad):
        return None
    resize, crop = steps
    if not isinstance(resize, Resize | ResizeKeepRatio) or not isinstance(resize.interpolation, InterpolationMode):
        return None
    resample = int(pil_modes_mapping[resize.interpolation])
    crop_size = (int(crop.size[0]), int(crop.size[1]))
    fill = getattr(crop, "fill", 0)
    fill_rgb = tuple(int(v) for v in fill) if isinstance(fill, list | tuple) else (int(fill),) * 3
    if isinstance(resize, ResizeKeepRatio):
        return Recipe(
            "keep_ratio",
            tuple(int(v) for v in resize.size),
            crop_size,
            resample,
            mean,
            std,
            longest=float(resize.longest),
            fill=fill_rgb,
        )
    size = [resize.size] if isinstance(resize.size, int) else list(resize.size)
    mode: Literal["short", "exact"] = "short" if len(size) == 1 else "exact"
    return Recipe(
        mode, tuple(int(v) for v in size), crop_size, resample, mean, std, max_size=resize.max_size, fill=fill_rgb
    )


def split_transform(transform: Callable[[Image.Image], torch.Tensor]) -> Recipe | None:
    """Split [resize, crop, ToTensor, Normalize] into a `Recipe`; None for any other shape (then run it whole).

    A resize + crop that this module cannot bound (not timm's eval shape) stops the load: its
    intermediate images could not be priced before they are allocated.
    """
    steps = list(getattr(transform, "transforms", []))
    at = next((i for i, step in enumerate(steps) if isinstance(step, MaybeToTensor | ToTensor)), None)
    if at is None or len(steps) != at + 2 or not isinstance(steps[at + 1], Normalize):
        return None
    normalize = steps[at + 1]
    mean = tuple(float(v) for v in torch.as_tensor(normalize.mean).flatten())
    std = tuple(float(v) for v in torch.as_tensor(normalize.std).flatten())
    recipe = _recipe(steps[:at], mean, std)
    if recipe is None:
        raise ConfigError(
            f"preprocessing {steps[:at]} is not timm's eval resize + center crop, so its cost per image "
            "cannot be bounded; use a timm architecture's data config (unset API_IMAGE_SIZE to try its own)"
        )
    return recipe


def build_transform(
    model: torch.nn.Module, *, image_size: int | None, pretrained_cfg: dict[str, Any] | None = None
) -> tuple[Callable[[Image.Image], torch.Tensor], dict[str, Any]]:
    """timm's eval transform for `model`, with `image_size` (when set) overriding the input size."""
    args = {"img_size": image_size} if image_size else None
    config = resolve_model_data_config(model, args=args, pretrained_cfg=pretrained_cfg or None)
    transform = create_transform(**config, is_training=False)
    return transform, config
