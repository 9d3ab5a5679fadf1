"""The recipe's resize + crop on the model's device (a batch of decoded images of any sizes).

What the engine process runs (`API_PREPROCESS=auto`): the front-ends ship decoded images instead of
resizing them with Pillow, which for a small photo costs three times the decode. Antialiased
like PIL (torch's `antialias=True` filters follow PIL's), then rounded to uint8, so the runtime sees
what it sees from the PIL path. On a CPU the 8-bit pixels are resized as they are, by torch's
vectorised uint8 kernels (Pillow-SIMD's algorithm: 8-bit between the two passes, as Pillow): about
0.26 ms for a 451x300 photo where Pillow takes 1.1 (fast) to 1.7 (exact); on a GPU in float32,
each pass rounded to 8 bits.
tests/integration/test_device_resize.py gates it against the exact PIL path on real photos for three
architectures and the demo's real weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from api.engine.images.recipe import Recipe

_MODES = {
    int(Image.Resampling.BICUBIC): "bicubic",
    int(Image.Resampling.BILINEAR): "bilinear",
    int(Image.Resampling.NEAREST): "nearest",
}


def resize_mode(recipe: Recipe) -> str | None:
    """torch's name for the recipe's filter, or None when torch has no match (then the PIL path)."""
    return _MODES.get(recipe.resample)


def _resize(chw: torch.Tensor, height: int, width: int, mode: str) -> torch.Tensor:
    """PIL's way: one pass along the width, rounded to 8 bits, then one along the height."""
    if mode == "nearest":
        return F.interpolate(chw, size=(height, width), mode=mode)
    if chw.dtype == torch.uint8:  # torch's 8-bit kernels make both passes, PIL's way
        return F.interpolate(chw, size=(height, width), mode=mode, antialias=True, align_corners=False)
    if chw.shape[-1] != width:
        chw = F.interpolate(chw, size=(chw.shape[-2], width), mode=mode, antialias=True, align_corners=False)
        chw = chw.round_().clamp_(0, 255)
    if chw.shape[-2] != height:
        chw = F.interpolate(chw, size=(height, width), mode=mode, antialias=True, align_corners=False)
    return chw


@torch.inference_mode()
def resize_crop(images: Sequence[np.ndarray], recipe: Recipe, device: torch.device) -> torch.Tensor:
    """H x W x 3 uint8 images (any sizes) -> N x crop_h x crop_w x 3 uint8 on `device`."""
    mode = resize_mode(recipe)
    assert mode is not None
    crop_h, crop_w = recipe.crop
    out = torch.empty((len(images), crop_h, crop_w, 3), dtype=torch.uint8, device=device)
    for row, image in enumerate(images):
        if not image.flags.writeable:  # torch shares the memory: hand it a copy of read-only pixels
            image = image.copy()
        height, width = image.shape[:2]
        if (height, width) == (crop_h, crop_w):
            out[row] = torch.from_numpy(np.ascontiguousarray(image)).to(device)
            continue
        pixels = torch.from_numpy(np.ascontiguousarray(image)).to(device, non_blocking=True)
        # 1 x 3 x H x W, channels last in memory with a whole image's batch stride: what the uint8
        # kernels take, and what makes their output channels last too (a third less CPU, and the crop
        # below a row copy instead of a transpose)
        chw = pixels.unsqueeze(0).permute(0, 3, 1, 2)
        if device.type != "cpu":
            chw = chw.float()
        new_w, new_h = recipe.resized_size(width, height)
        if (new_w, new_h) != (width, height):
            chw = _resize(chw, new_h, new_w, mode)
        left, top, right, bottom = recipe.crop_box(new_w, new_h)
        pad = (max(-left, 0), max(right - new_w, 0), max(-top, 0), max(bottom - new_h, 0))
        if any(pad):
            filled = [F.pad(chw[:, c : c + 1], pad, value=recipe.fill[c]) for c in range(3)]
            chw = torch.cat(filled, dim=1)
            left, top = left + pad[0], top + pad[2]
        chw = chw[:, :, top : top + crop_h, left : left + crop_w]
        if chw.dtype != torch.uint8:
            chw = chw.round_().clamp_(0, 255).to(torch.uint8)
        out[row] = chw[0].permute(1, 2, 0)
    return out
