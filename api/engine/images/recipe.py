"""timm's eval resize + center crop in plain Pillow: the preprocessing recipe, with no torch.

The engine reads the recipe off timm's transform once (`api.engine.model.preprocess.split_transform`)
and hands it to every front-end process in the handshake, so a process that never imports torch
preprocesses exactly as the model expects (tests/unit/test_recipe.py: bit for bit equal to timm's
own steps). Its sizes are torchvision's and timm's arithmetic: `short` (torchvision `Resize(int)`:
shorter side), `exact` (`Resize((h, w))`), `keep_ratio` (timm `ResizeKeepRatio`), then a center crop
that pads with `fill` where the image is smaller (torchvision `CenterCrop`, timm `CenterCropOrPad`).

The resize + crop costs what the crop costs, whatever the aspect ratio: when the resized image would
be far larger than the crop (a 50,000 x 1 strip scaled so its shorter side is 235), only the part
the crop keeps is resized (Pillow's `resize(box=...)`); the two agree to rounding.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image

from api.errors import ImageTooLarge

# The exact timm steps run while the resized image is at most this many times the crop.
EXACT_RESIZE_LIMIT = 16


@dataclass(frozen=True)
class Recipe:
    mode: Literal["short", "exact", "keep_ratio"]
    size: tuple[int, ...]  # short: (shorter side,); exact and keep_ratio: (height, width)
    crop: tuple[int, int]  # (height, width)
    resample: int  # a PIL.Image.Resampling value
    mean: tuple[float, ...]
    std: tuple[float, ...]
    max_size: int | None = None  # torchvision Resize's cap on the longer side
    longest: float = 0.0  # timm ResizeKeepRatio: 0 fits the shorter side, 1 the longer
    fill: tuple[int, ...] = (0, 0, 0)  # the crop's padding colour

    # --- sizes ---------------------------------------------------------------------------------

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) the resize step produces for a `width` x `height` image."""
        if self.mode == "exact":
            return self.size[1], self.size[0]
        if self.mode == "keep_ratio":
            target_h, target_w = self.size
            ratio_h, ratio_w = height / target_h, width / target_w
            ratio = max(ratio_h, ratio_w) * self.longest + min(ratio_h, ratio_w) * (1.0 - self.longest)
            return round(width / ratio), round(height / ratio)
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.size[0], int(self.size[0] * long / short)
        if self.max_size is not None and new_long > self.max_size:
            new_short, new_long = int(self.max_size * new_short / new_long), self.max_size
        return (new_short, new_long) if width <= height else (new_long, new_short)

    def crop_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """The crop's (left, top, right, bottom) in a `width` x `height` resized image (it may reach
        outside, where the image is smaller than the crop: that part is padding)."""
        crop_h, crop_w = self.crop
        left = -((crop_w - width) // 2) if crop_w > width else round((width - crop_w) / 2.0)
        top = -((crop_h - height) // 2) if crop_h > height else round((height - crop_h) / 2.0)
        return left, top, left + crop_w, top + crop_h

    def source_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """What the model sees of a `width` x `height` image: the crop's (left, top, right, bottom) in
        the image's own pixels (beyond its edges where the crop pads)."""
        resized_w, resized_h = self.resized_size(width, height)
        left, top, right, bottom = self.crop_box(resized_w, resized_h)
        sx, sy = width / resized_w, height / resized_h
        return (round(left * sx, 1), round(top * sy, 1), round(right * sx, 1), round(bottom * sy, 1))

    @property
    def resize_short_side(self) -> int:
        """The shorter side the resize aims at (what reduced-scale JPEG decoding may go down to)."""
        return self.size[0] if self.mode == "short" else min(self.size)

    # --- pixels ---------------------------------------------------------------------------------

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = self.resized_size(image.width, image.height)
        crop_h, crop_w = self.crop
        if width * height <= EXACT_RESIZE_LIMIT * crop_w * crop_h:
            resized = image if (width, height) == image.size else image.resize((width, height), self.resample)
            return self._crop(resized)
        if width < crop_w or height < crop_h:  # padding a huge strip: no ordinary photo is shaped so
            raise ImageTooLarge(
                f"image aspect ratio {image.width}:{image.height} is too extreme to preprocess; "
                "crop it closer to the subject and send it again"
            )
        return self.resample_crop(image, width, height)

    def resample_crop(
        self, image: Image.Image, width: int, height: int, reducing_gap: float | None = None
    ) -> Image.Image:
        """The crop of `image` resized to `width` x `height`, resampling only the crop's region (Pillow's
        `resize(box=...)`, the same filter): equal to resizing the whole image and cropping, to rounding.
        The crop must lie inside the resized image."""
        left, top, right, bottom = self.crop_box(width, height)
        scale_x, scale_y = image.width / width, image.height / height
        box = (left * scale_x, top * scale_y, right * scale_x, bottom * scale_y)
        return image.resize(self.crop[::-1], self.resample, box=box, reducing_gap=reducing_gap)

    def _crop(self, image: Image.Image) -> Image.Image:
        left, top, right, bottom = box = self.crop_box(image.width, image.height)
        if left >= 0 and top >= 0 and right <= image.width and bottom <= image.height:
            return image.crop(box)
        canvas = Image.new(image.mode, self.crop[::-1], self.fill[: len(image.getbands())])
        canvas.paste(
            image.crop((max(left, 0), max(top, 0), min(right, image.width), min(bottom, image.height))),
            (max(-left, 0), max(-top, 0)),
        )
        return canvas

    def pixels(self, image: Image.Image) -> np.ndarray:
        """RGB image -> crop height x width x 3 uint8, resized and cropped as the model expects."""
        return np.asarray(self(image).convert("RGB"), dtype=np.uint8)

    # --- the handshake ----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        tuples = ("size", "crop", "mean", "std", "fill")
        values: dict[str, Any] = {k: tuple(v) if k in tuples else v for k, v in data.items()}
        return cls(**values)
