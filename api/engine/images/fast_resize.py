"""The recipe's resize + crop, resizing only what the crop keeps: about 60 % of the exact path's CPU.

The exact path (`Recipe.pixels`, timm's own steps) resizes the whole image and then crops it: for a
451x300 photo and resnet50's recipe, 353x235 pixels are resampled and 224x224 kept. Here Pillow
resamples only the crop's region of the source (`resize(box=...)`), with the same filter, so the
pixels agree with the exact path to rounding (at most 1 of 255 apart, on about one pixel in ten
thousand); a source more than `REDUCING_GAP` times the resized size is first averaged over k x k
blocks (Pillow's `reducing_gap`, a box filter, as reduced-scale JPEG decoding does in the decoder).
Held to the gate of the device resize: top-1 agreement >= 99.5 % and max |probability difference| <=
0.02 against the exact path on real photos, for three architectures and the demo's real weights
(tests/integration/test_device_resize.py). OpenCV's resizes, ten times cheaper, fail that gate
(docs/performance.md). Crops that pad go the exact way; `API_RESIZE=exact` keeps every image there.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from api.engine.images.recipe import Recipe

REDUCING_GAP = 3.0


def covers(recipe: Recipe, width: int, height: int) -> bool:
    """Whether the fast path takes a `width` x `height` image: its crop lies inside the resized image."""
    resized_w, resized_h = recipe.resized_size(width, height)
    left, top, right, bottom = recipe.crop_box(resized_w, resized_h)
    return left >= 0 and top >= 0 and right <= resized_w and bottom <= resized_h


def resize_crop(image: Image.Image, recipe: Recipe) -> np.ndarray:
    """RGB image (one `covers` takes) -> crop height x width x 3 uint8."""
    resized_w, resized_h = recipe.resized_size(image.width, image.height)
    if (resized_w, resized_h) == image.size:
        return np.asarray(image.crop(recipe.crop_box(resized_w, resized_h)))
    return np.asarray(recipe.resample_crop(image, resized_w, resized_h, reducing_gap=REDUCING_GAP))


def pixels(image: Image.Image, recipe: Recipe, resize: str) -> np.ndarray:
    """The model's input for `image`: the fast path where `resize` is "fast" and it covers the image,
    else the exact path."""
    if resize == "fast" and covers(recipe, image.width, image.height):
        return resize_crop(image, recipe)
    return recipe.pixels(image)
