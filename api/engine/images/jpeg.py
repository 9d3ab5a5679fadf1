"""The common case's decode: a colour JPEG that needs no turn, decoded by libjpeg-turbo straight into
an H x W x 3 array (simplejpeg), with the pixels Pillow's decode gives.

Pillow decodes into its own 4-bytes-a-pixel canvas and hands numpy a copy made under the GIL (its
`tobytes` loop); for a 451x300 photo that is 0.6 ms of a decode thread's CPU where libjpeg-turbo
alone takes 0.35 ms, and the GIL it holds is the event loop's. Everything else is Pillow's as before:
`decode_image` opens the file, checks the canvas and prices the decode with Pillow, and only then
asks `takes` whether this module decodes the pixels. Same library, same choices (accurate integer
IDCT, smooth chroma upsampling, the scale Pillow's `draft` chose), so the same pixels: a test holds
the two to equality on real photos at every scale, subsampling and progressive or baseline coding.
Anything else (grey, CMYK, an EXIF turn, a file libjpeg-turbo only recovers from) takes Pillow's way,
so its answer, and its error, stay Pillow's.
"""

from __future__ import annotations

import numpy as np
import simplejpeg
from PIL import Image

# What Pillow opens as a JPEG whose first image this module may decode (MPO: the first of several).
FORMATS = ("JPEG", "MPO")


def takes(image: Image.Image, *, rotated: bool) -> bool:
    """Whether `image` (opened, maybe drafted, not loaded) is a 3-colour JPEG that needs no EXIF turn."""
    return image.format in FORMATS and image.mode == "RGB" and not rotated


def decode(data: bytes, width: int, height: int) -> np.ndarray | None:
    """`data`'s pixels at `width` x `height` (its size, or the reduced size Pillow's `draft` chose), or
    None where libjpeg-turbo only recovers from what it read (then Pillow decodes, and refuses it)."""
    try:
        pixels = simplejpeg.decode_jpeg(
            data, colorspace="RGB", fastdct=False, fastupsample=False, min_width=width, min_height=height, strict=True
        )
    except ValueError:
        return None
    return pixels if pixels.shape == (height, width, 3) else None
