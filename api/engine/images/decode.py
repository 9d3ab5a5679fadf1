"""Bytes -> 8-bit RGB image, with no torch: what a front-end process and the engine both run.

The type of an upload is decided from its bytes (never from the declared Content-Type or file
name), the canvas size is checked and the whole decode priced (`api.engine.images.budget`) from the header
before any pixel is decoded, EXIF orientation is applied, and every mode Pillow can open is brought
to 8-bit RGB the way a viewer would show it.
"""

from __future__ import annotations

import ctypes
import functools
import io
import itertools
import math
import warnings
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
from PIL import (
    AvifImagePlugin,
    ExifTags,
    Image,
    ImageMode,
    ImageOps,
    PngImagePlugin,
    UnidentifiedImageError,
    WebPImagePlugin,
)

from api.engine.images import jpeg
from api.engine.images.budget import HIGH_DEPTH, WITH_ALPHA, Cost, DecodeBudget, ImageFacts
from api.engine.memory import release_after_decode
from api.errors import EmptyFile, ImageTooLarge, InvalidImage, UnsupportedMediaType

# Raster formats a camera, phone, browser or scanner produces. Pillow can open more (EPS, PSD,
# ICNS...), some through external programs; we refuse those rather than widen the attack surface.
ALLOWED_FORMATS = ("JPEG", "MPO", "PNG", "GIF", "WEBP", "BMP", "TIFF", "AVIF")

# Pillow's own limits, tightened for untrusted uploads: all of a PNG's text chunks together (zTXt and
# iTXt inflate a few bytes into megabytes; each chunk stays capped at 1 MB, which ICC profiles need),
# and one thread per AVIF decode (the decode pool is the parallelism; one upload, one core).
PngImagePlugin.MAX_TEXT_MEMORY = 4 * 1024**2
AvifImagePlugin.DEFAULT_MAX_THREADS = 1


def _silence_libtiff() -> None:
    """libtiff prints its warnings and errors about a file straight to stderr, where they would
    reach the log stream as unstructured lines. Pillow turns the failure into an exception (a 400
    here) either way, so libtiff's message handlers are turned off, in the copy Pillow loaded."""
    try:
        with open("/proc/self/maps") as maps:  # Pillow's wheels bundle their own libtiff
            path = next((line.split()[-1] for line in maps if "/libtiff" in line), None)
        libtiff = ctypes.CDLL(path) if path else None
    except OSError:  # not Linux
        return
    for name in ("TIFFSetErrorHandler", "TIFFSetWarningHandler"):
        setter = getattr(libtiff, name, None)
        if setter is not None:
            setter.restype, setter.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
            setter(None)


_silence_libtiff()

_IMAGE_MAGIC: tuple[bytes, ...] = (
    b"\xff\xd8\xff",  # JPEG
    b"\x89PNG\r\n\x1a\n",
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"II*\x00",  # TIFF little-endian
    b"MM\x00*",  # TIFF big-endian
)


# The format named for pixels a client decoded itself (the v2 pixels model's UINT8 [N, H, W, 3] input).
PIXELS_FORMAT = "RGB8"

# What Pillow's decoders raise for a file they cannot read.
_CORRUPT = (OSError, ValueError, SyntaxError, EOFError)


@dataclass(frozen=True)
class DecodedImage:
    """8-bit RGB pixels: a Pillow image, or an H x W x 3 array where libjpeg-turbo decoded a JPEG
    straight into one (`api.engine.images.jpeg`); `width` and `height` are the canvas before any
    reduced-scale decode."""

    source: Image.Image | np.ndarray
    width: int
    height: int
    format: str
    cost: Cost  # what decoding it was priced at (api.engine.images.budget)

    @property
    def size(self) -> tuple[int, int]:
        """The decoded pixels' width and height."""
        if isinstance(self.source, np.ndarray):
            return self.source.shape[1], self.source.shape[0]
        return self.source.size

    @property
    def image(self) -> Image.Image:
        """The pixels as a Pillow image (a copy, where they are an array)."""
        return self.source if isinstance(self.source, Image.Image) else Image.fromarray(self.source)

    @property
    def pixels(self) -> np.ndarray:
        """The pixels as an H x W x 3 uint8 array (a copy, where they are a Pillow image)."""
        return self.source if isinstance(self.source, np.ndarray) else np.asarray(self.source, dtype=np.uint8)


@cache
def _open_formats() -> tuple[str, ...]:
    Image.init()  # registers every plugin, so MPO and AVIF are known when this Pillow build has them
    return tuple(fmt for fmt in ALLOWED_FORMATS if fmt in Image.OPEN)


def _is_webp(data: bytes) -> bool:
    return data[:4] == b"RIFF" and data[8:12] == b"WEBP"


def _looks_like_image(data: bytes) -> bool:
    if _is_webp(data):
        return True
    if data[4:12] in (b"ftypavif", b"ftypavis"):
        return True
    return data.startswith(_IMAGE_MAGIC)


@dataclass
class OpenedImage:
    """An upload opened and priced, not decoded: its header read (and a reduced scale chosen), its
    cost known. `decode` makes the pixels, once; the two halves may run on different threads (a
    front-end decodes a cheap photo on its event loop, a costly one in its decode pool)."""

    image: Image.Image  # opened by Pillow, maybe drafted, not loaded
    data: bytes
    width: int  # the canvas, before any reduced-scale decode
    height: int
    format: str
    cost: Cost
    rotated: bool
    max_pixels: int

    def decode(self) -> DecodedImage:
        """The pixels, 8-bit RGB; InvalidImage (400) for a file that breaks while decoding."""
        image, cost = self.image, self.cost
        done = functools.partial(DecodedImage, width=self.width, height=self.height, format=self.format, cost=cost)
        if jpeg.takes(image, rotated=self.rotated):
            pixels = jpeg.decode(self.data, image.width, image.height)
            if pixels is not None:
                image.close()
                return done(source=pixels)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own, lower limit holds
            try:
                image.load()
                ImageOps.exif_transpose(image, in_place=True)  # no copy when there is nothing to turn
                rgb = to_rgb(image)
            except Image.DecompressionBombError as error:
                raise _too_large(error, self.max_pixels) from None
            except _CORRUPT as error:
                image.close()  # the part-decoded canvas goes now, not with the traceback
                release_after_decode(cost.memory)
                raise InvalidImage(f"corrupt or truncated image: {error}") from None
        return done(source=rgb)


def open_image(data: bytes, *, max_pixels: int, reduce_to: int | None = None, budget: DecodeBudget) -> OpenedImage:
    """Open an upload and price its decode, refusing non-images, corrupt headers and bombs.

    With `reduce_to` (the shorter side the model's transform resizes to), a JPEG much larger than
    that will be decoded at 1/2, 1/4 or 1/8 scale by the decoder itself (Pillow's `draft`), never
    below `reduce_to`: a 12-megapixel photo then costs a fraction of a full decode. Before anything is
    allocated the image is priced from its header (`api.engine.images.budget`) and refused (413) when it
    would cost more than `budget`.
    """
    if not data:
        raise EmptyFile("the uploaded file is empty")
    _check_before_open(data, max_pixels, budget)
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
        _check_canvas(width, height, max_pixels)
        fmt = image.format or "unknown"
        try:
            if reduce_to and fmt in ("JPEG", "MPO") and min(width, height) >= 2 * reduce_to:
                scale = reduce_to / min(width, height)
                image.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
            facts = image_facts(image, data, (width, height))
            cost = budget.check(facts)
        except (*_CORRUPT, TypeError, KeyError, IndexError, ZeroDivisionError) as error:
            # header fields that make no sense (a zero sampling factor, a tile size of the wrong type)
            raise InvalidImage(f"corrupt image header: {error or type(error).__name__}") from None
    return OpenedImage(image, data, width, height, fmt, cost, facts.rotated, max_pixels)


def decode_image(data: bytes, *, max_pixels: int, reduce_to: int | None = None, budget: DecodeBudget) -> DecodedImage:
    """Decode an upload into an RGB image: `open_image`, then its `decode`."""
    return open_image(data, max_pixels=max_pixels, reduce_to=reduce_to, budget=budget).decode()


def check_pixels(pixels: np.ndarray, *, max_pixels: int, budget: DecodeBudget) -> Cost:
    """8-bit RGB pixels (H, W, 3) a client decoded itself, checked and priced as an upload's canvas
    is (a raw canvas costs Pillow's RGB copy and the resize): their cost, or 413."""
    height, width = pixels.shape[:2]
    _check_canvas(width, height, max_pixels)
    return budget.check(ImageFacts(PIXELS_FORMAT, "RGB", width, height, width, height))


def _check_canvas(width: int, height: int, max_pixels: int) -> None:
    if width < 1 or height < 1:
        raise InvalidImage(f"image has an empty canvas ({width}x{height})")
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels} (API_MAX_IMAGE_PIXELS)"
        )


def _check_before_open(data: bytes, max_pixels: int, budget: DecodeBudget) -> None:
    """libwebp allocates its canvases when the file is opened, so a WebP is priced from its header
    first: as RGB, the least it can cost (the full price is checked once it is open)."""
    if not _is_webp(data):
        return
    size = WebPImagePlugin._get_size(data[:30])
    if size is None:
        return
    _check_canvas(*size, max_pixels)
    variant = "lossless" if _webp_chunk(data) == b"VP8L" else ""
    budget.check(ImageFacts("WEBP", "RGB", *size, *size, variant=variant))


def image_facts(image: Image.Image, data: bytes, declared: tuple[int, int]) -> ImageFacts:
    """What `image` (opened, not loaded; `declared` is its canvas before any draft) will cost to decode."""
    fmt = image.format or "unknown"
    width, height = declared
    facts: dict[str, Any] = {
        "format": fmt,
        "mode": image.mode,
        "width": width,
        "height": height,
        "decoded_width": image.width,
        "decoded_height": image.height,
        "variant": _variant(image, data),
        "rotated": _may_rotate(image, data),
        "has_transparency": "transparency" in image.info,
        "raw_bytes_per_pixel": _raw_bytes_per_pixel(image),
    }
    if fmt in ("JPEG", "MPO"):
        facts["jpeg_samples"] = _jpeg_samples(image, width, height)
        facts["jpeg_scans"] = max(1, _jpeg_scans(data))
    elif fmt == "TIFF":
        facts.update(_tiff_buffers(image, width, height, facts["raw_bytes_per_pixel"]))
    return ImageFacts(**facts)


def _variant(image: Image.Image, data: bytes) -> str:
    if image.format == "PNG" and image.info.get("interlace"):
        return "interlaced"
    if image.format == "WEBP" and _webp_chunk(data) == b"VP8L":
        return "lossless"
    return ""


def _webp_chunk(data: bytes) -> bytes | None:
    """The first image chunk of a WebP (VP8 lossy, VP8L lossless), walking the RIFF chunk list."""
    offset = 12
    while offset + 8 <= len(data):
        kind, size = data[offset : offset + 4], int.from_bytes(data[offset + 4 : offset + 8], "little")
        if kind in (b"VP8 ", b"VP8L"):
            return kind
        if kind == b"ANMF":  # an animation frame: its image chunk follows the 16-byte frame header
            offset += 8 + 16
            continue
        offset += 8 + size + (size & 1)
    return None


def _may_rotate(image: Image.Image, data: bytes) -> bool:
    if image.format == "PNG" and "exif" not in image.info:
        # a PNG may carry its EXIF after the pixels, where only a full decode finds it
        return any(marker in data for marker in (b"eXIf", b"Raw profile type exif", b"Orientation"))
    try:
        return image.getexif().get(ExifTags.Base.Orientation, 1) in range(2, 9)
    except Exception:  # broken EXIF: exif_transpose will hit it too, after pricing the turn
        return True


def _raw_bytes_per_pixel(image: Image.Image) -> float:
    """Bytes per pixel as the file stores them (16-bit samples inflate twice the bytes of 8-bit)."""
    rawmode = next(
        (arg for tile in getattr(image, "tile", []) for arg in _as_tuple(tile.args) if isinstance(arg, str)), None
    )
    if rawmode is None:
        return 8.0
    base, _, suffix = rawmode.partition(";")
    digits = "".join(itertools.takewhile(str.isdigit, suffix))
    bits = int(digits) if digits else (1 if base == "1" else 8)
    try:
        bands = len(ImageMode.getmode(base).bands)
    except KeyError:  # raw layouts that are not modes (BGR, RGBX...): one letter a band
        bands = len(base)
    return max(bands * bits / 8, 0.125)


def _as_tuple(args: Any) -> tuple[Any, ...]:
    return args if isinstance(args, tuple) else (args,)


def _jpeg_samples(image: Image.Image, width: int, height: int) -> int:
    """Full-scale samples over all components, padded to whole 8x8 blocks of each."""
    layers = getattr(image, "layer", None) or [("", 1, 1, 0)] * 3
    h_max = max(layer[1] for layer in layers)
    v_max = max(layer[2] for layer in layers)
    total = 0
    for _, h, v, _ in layers:
        total += 64 * math.ceil(width * h / h_max / 8) * math.ceil(height * v / v_max / 8)
    return total


def _jpeg_scans(data: bytes) -> int:
    """Start-of-scan markers (0xFF is stuffed in scan data, so every 0xFF 0xDA is one): the bytes
    after each 0xFF, vectorised (five times `bytes.count`'s speed on a photo's 0xFF-rich data)."""
    view = np.frombuffer(data, np.uint8)
    after_ff = np.flatnonzero(view[:-1] == 0xFF) + 1
    return int(np.count_nonzero(view[after_ff] == 0xDA))


def _tiff_buffers(image: Image.Image, width: int, height: int, raw_bpp: float) -> dict[str, int]:
    """libtiff decodes whole strips or tiles: a tile may be declared far larger than the canvas."""
    tags = getattr(image, "tag_v2", {})
    bpp = max(raw_bpp, 4.0)  # the RGBA reading paths (YCbCr, old JPEG) use 4 bytes per pixel
    tile_w, tile_h = tags.get(322), tags.get(323)
    if tile_w and tile_h:
        area = math.ceil(width / tile_w) * tile_w * math.ceil(height / tile_h) * tile_h
        return {"buffer_bytes": int(tile_w * tile_h * bpp), "decoded_area": area}
    rows = min(int(tags.get(278) or height), height)
    return {"buffer_bytes": int(width * rows * bpp), "decoded_area": width * height}


def _too_large(error: Exception, max_pixels: int) -> ImageTooLarge:
    return ImageTooLarge(
        f"image canvas is too large ({error}); the limit is {max_pixels} pixels (API_MAX_IMAGE_PIXELS)"
    )


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparency is composited onto white.

    Each step's buffers are what `api.engine.images.budget` prices for the mode: no step copies an image
    it does not change.
    """
    if image.mode == "RGB":
        return image
    if image.mode in HIGH_DEPTH:
        return _high_depth_to_rgb(image)
    if image.mode in WITH_ALPHA or (image.mode == "P" and "transparency" in image.info):
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba, mask=rgba)  # the same pixels as alpha_composite onto white, in one RGB canvas
        return white
    return image.convert("RGB")


_ROWS_PER_CHUNK_BYTES = 4 * 1024**2


def _high_depth_to_rgb(image: Image.Image) -> Image.Image:
    # Pillow's own convert("RGB") clips 16-bit and float values at 255; scale them instead, in
    # place on one copy of the samples (integers) or a few rows at a time (float), never as a
    # float64 copy of the whole image.
    pixels = np.array(image)
    if image.mode == "F":
        gray = _float_to_gray(pixels)
    else:
        if pixels.max(initial=0) > 255:
            np.floor_divide(pixels, 257, out=pixels)
        np.clip(pixels, 0, 255, out=pixels)
        gray = pixels.astype(np.uint8)
    del pixels
    return Image.fromarray(gray, mode="L").convert("RGB")


def _float_to_gray(pixels: np.ndarray) -> np.ndarray:
    """Float samples -> 8-bit gray: [0, 1] scaled by 255, any other range stretched to [0, 255]."""
    low, high = float(np.nanmin(pixels, initial=np.inf)), float(np.nanmax(pixels, initial=-np.inf))
    if low >= 0.0 and high <= 1.0:
        offset, scale = 0.0, 255.0
    elif high > low:
        offset, scale = low, 255.0 / (high - low)
    else:
        offset, scale = 0.0, 1.0
    gray = np.empty(pixels.shape, dtype=np.uint8)
    step = max(1, _ROWS_PER_CHUNK_BYTES // max(1, pixels.shape[1] * 8))
    for top in range(0, pixels.shape[0], step):
        rows = pixels[top : top + step].astype(np.float64)
        rows -= offset
        rows *= scale
        np.nan_to_num(rows, copy=False)
        np.clip(rows, 0, 255, out=rows)
        gray[top : top + step] = rows
    return gray
