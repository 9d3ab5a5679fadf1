"""Bytes -> RGB image -> model input tensor.

The type of an upload is decided from its bytes (never from the declared Content-Type or file
name), the canvas size is checked from the header before any pixel is decoded, EXIF orientation is
applied, and every mode Pillow can open is brought to 8-bit RGB the way a viewer would show it.
The tensor transform is timm's eval transform for the architecture's data config.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from timm.data import create_transform, resolve_model_data_config
from timm.data.transforms import MaybeToTensor
from torchvision.transforms import Compose, Normalize, ToTensor

from api.errors import ImageTooLarge, InvalidImage, UnsupportedMediaType

# Raster formats a camera, phone, browser or scanner produces. Pillow can open more (EPS, PSD,
# ICNS...), some through external programs; we refuse those rather than widen the attack surface.
ALLOWED_FORMATS = ("JPEG", "MPO", "PNG", "GIF", "WEBP", "BMP", "TIFF", "AVIF")

_IMAGE_MAGIC: tuple[bytes, ...] = (
    b"\xff\xd8\xff",  # JPEG
    b"\x89PNG\r\n\x1a\n",
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"II*\x00",  # TIFF little-endian
    b"MM\x00*",  # TIFF big-endian
)


@dataclass(frozen=True)
class DecodedImage:
    image: Image.Image
    width: int
    height: int
    format: str


@cache
def _open_formats() -> tuple[str, ...]:
    Image.init()  # registers every plugin, so MPO and AVIF are known when this Pillow build has them
    return tuple(fmt for fmt in ALLOWED_FORMATS if fmt in Image.OPEN)


def _looks_like_image(data: bytes) -> bool:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return True
    if data[4:12] in (b"ftypavif", b"ftypavis"):
        return True
    return data.startswith(_IMAGE_MAGIC)


def decode_image(data: bytes, *, max_pixels: int, reduce_to: int | None = None) -> DecodedImage:
    """Decode an upload into an RGB image, refusing non-images, corrupt files and bombs.

    With `reduce_to` (the shorter side the model's transform resizes to), a JPEG much larger than
    that is decoded at 1/2, 1/4 or 1/8 scale by the decoder itself (Pillow's `draft`), never below
    `reduce_to`: a 12-megapixel photo then costs a fraction of a full decode.
    """
    if not data:
        raise InvalidImage("the uploaded file is empty", code="empty_file")
    with warnings.catch_warnings():
        # Pillow warns (DecompressionBombWarning) where we already refuse by our own, lower limit.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=_open_formats())
        except UnidentifiedImageError:
            if _looks_like_image(data):
                raise InvalidImage("the file looks like an image but its header is corrupt") from None
            raise UnsupportedMediaType(
                f"not a supported image; send one of {', '.join(f.lower() for f in ALLOWED_FORMATS)}"
            ) from None
        except Image.DecompressionBombError as error:
            raise _too_large(error, max_pixels) from None
        except (OSError, ValueError, SyntaxError) as error:
            raise InvalidImage(f"corrupt image: {error}") from None
        width, height = image.size
        if width < 1 or height < 1:
            raise InvalidImage(f"image has an empty canvas ({width}x{height})")
        if width * height > max_pixels:
            raise ImageTooLarge(
                f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels} (API_MAX_IMAGE_PIXELS)"
            )
        fmt = image.format or "unknown"
        try:
            if reduce_to and fmt in ("JPEG", "MPO") and min(width, height) >= 2 * reduce_to:
                scale = reduce_to / min(width, height)
                image.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
            image.load()
            image = ImageOps.exif_transpose(image)
            rgb = to_rgb(image)
        except Image.DecompressionBombError as error:
            raise _too_large(error, max_pixels) from None
        except (OSError, ValueError, SyntaxError, EOFError) as error:
            raise InvalidImage(f"corrupt or truncated image: {error}") from None
    return DecodedImage(image=rgb, width=width, height=height, format=fmt)


def _too_large(error: Exception, max_pixels: int) -> ImageTooLarge:
    return ImageTooLarge(
        f"image canvas is too large ({error}); the limit is {max_pixels} pixels (API_MAX_IMAGE_PIXELS)"
    )


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparency is composited onto white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return _high_depth_to_rgb(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _high_depth_to_rgb(image: Image.Image) -> Image.Image:
    # Pillow's own convert("RGB") clips 16-bit and float values at 255; scale them instead.
    pixels = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        low, high = float(np.nanmin(pixels)), float(np.nanmax(pixels))
        if low >= 0.0 and high <= 1.0:
            pixels = pixels * 255.0
        elif high > low:
            pixels = (pixels - low) * (255.0 / (high - low))
    elif pixels.max(initial=0) > 255:
        pixels = pixels / 257.0
    gray = np.nan_to_num(pixels).clip(0, 255).astype(np.uint8)
    return Image.fromarray(gray, mode="L").convert("RGB")


@dataclass(frozen=True)
class SplitTransform:
    """timm's eval transform cut where the PIL work ends.

    The PIL part (resize, crop) runs in the decode pool and yields uint8 pixels, with no torch op,
    so decode threads never start torch thread teams that would compete with the forward pass;
    to-tensor and normalisation then run once per batch in the inference thread (on the GPU when
    there is one, which also moves 4x fewer bytes to it).
    """

    pil: Callable[[Image.Image], Image.Image]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def pixels(self, image: Image.Image) -> np.ndarray:
        """RGB image -> HxWx3 uint8, resized and cropped as the model expects."""
        return np.asarray(self.pil(image).convert("RGB"), dtype=np.uint8)


def split_transform(transform: Callable[[Image.Image], torch.Tensor]) -> SplitTransform | None:
    """Split [PIL steps..., ToTensor, Normalize]; None for any other shape (then run it whole)."""
    steps = list(getattr(transform, "transforms", []))
    at = next((i for i, step in enumerate(steps) if isinstance(step, MaybeToTensor | ToTensor)), None)
    if at is None or len(steps) != at + 2 or not isinstance(steps[at + 1], Normalize):
        return None
    normalize = steps[at + 1]
    mean = tuple(float(v) for v in torch.as_tensor(normalize.mean).flatten())
    std = tuple(float(v) for v in torch.as_tensor(normalize.std).flatten())
    return SplitTransform(Compose(steps[:at]), mean, std)


def build_transform(
    model: torch.nn.Module, *, image_size: int | None, pretrained_cfg: dict[str, Any] | None = None
) -> tuple[Callable[[Image.Image], torch.Tensor], dict[str, Any]]:
    """timm's eval transform for `model`, with `image_size` (when set) overriding the input size."""
    args = {"img_size": image_size} if image_size else None
    config = resolve_model_data_config(model, args=args, pretrained_cfg=pretrained_cfg or None)
    transform = create_transform(**config, is_training=False)
    return transform, config
