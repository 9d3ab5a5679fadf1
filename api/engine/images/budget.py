"""What decoding and preprocessing one upload will cost, worked out from its header before a pixel is decoded.

A file's size says little about its cost: a 200-byte PNG can declare a 50,000 x 1 canvas, a 10 MB
progressive JPEG can hold thousands of scans, a TIFF can declare tiles far larger than its canvas.
So every upload is priced first, from what its header says it will make the decoder and our
preprocessing allocate and compute, step by step:

    decode       the canvas at the decoded size (JPEGs decode at reduced scale where they can), in
                 the mode's own bytes per pixel, plus what the decoder holds beside it (libwebp's
                 frame canvases, AVIF's planes, a multi-scan JPEG's coefficients, a TIFF tile)
    EXIF         one more canvas when the orientation tag asks for a rotation or a flip
    to RGB       the conversions `api.engine.images.decode.to_rgb` makes for the mode (alpha composited on white,
                 16-bit and float samples scaled)
    resize+crop  reads the canvas once; its own buffers are bounded by the model's input size
                 (`api.engine.images.recipe.Recipe`), whatever the aspect ratio

The price has two parts: peak memory (bytes) and work, in units of the time a full-scale baseline
JPEG takes to decode one pixel (measured per format and step on this project's build machine, so
a WebP or a PNG costs more work per pixel than a JPEG). The budget is the price of a reference
photo, a baseline RGB JPEG of `megapixels` decoded at full scale and EXIF-rotated as phones store
portraits (`API_DECODE_BUDGET_MP`); an upload priced above it in memory or in work is refused (413)
before anything is allocated, with a message that says what it would cost and what would pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from api.errors import ImageTooCostly

# Pillow's storage: 1 byte per pixel for these modes, 2 for 16-bit gray, 4 for everything else
# (RGB is stored as RGBX).
_ONE_BYTE = frozenset({"1", "L", "P"})
_TWO_BYTES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
HIGH_DEPTH = frozenset({"I", "F", *_TWO_BYTES})
WITH_ALPHA = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})

# Work per decoded pixel, in full-scale baseline JPEG pixels (JPEG itself is priced from its scans,
# below), by format and variant; measured, then rounded up. PNG and TIFF inflate their raw
# samples, so they are priced per raw byte (an Adam7-interlaced PNG makes seven passes).
_WORK_PER_PIXEL = {("WEBP", ""): 4.5, ("WEBP", "lossless"): 7.5, ("AVIF", ""): 3.6, ("GIF", ""): 1.2, ("BMP", ""): 0.4}
_WORK_PER_RAW_BYTE = {("PNG", ""): 1.3, ("PNG", "interlaced"): 1.35, ("TIFF", ""): 1.0}
# What the decoder holds beside the canvas, per decoded pixel: libwebp's animation decoder keeps
# two RGBA canvases and hands the frame over as a third copy; libavif's planes (4:4:4, 16-bit).
_DECODER_BYTES_PER_PIXEL = {"WEBP": 12, "AVIF": 6}
# Baseline JPEG: entropy decoding visits every coefficient of the full-scale image (also when it
# decodes at reduced scale), each further scan visits them again; the inverse DCT and colour
# conversion scale with the decoded pixels.
_JPEG_PER_SAMPLE = 0.2
_JPEG_PER_SAMPLE_SCAN = 0.1
_JPEG_PER_DECODED_PIXEL = 0.6
_JPEG_COEFFICIENT_BYTES = 2  # a multi-scan JPEG keeps every 16-bit coefficient of the full image
_TRANSPOSE_WORK = 0.45
_RESIZE_WORK = 1.2  # the resize reads the whole canvas once
_TOUCH_WORK_PER_BYTE = 0.06  # first use of fresh memory (page faults)


def canvas_bytes_per_pixel(mode: str) -> int:
    if mode in _ONE_BYTE:
        return 1
    if mode in _TWO_BYTES:
        return 2
    return 4


def _conversion(mode: str, has_transparency: bool) -> tuple[int, float]:
    """Bytes allocated and work per pixel of `api.engine.images.decode.to_rgb` for an image in `mode`."""
    if mode == "RGB":
        return 0, 0.0
    if mode in WITH_ALPHA or (mode == "P" and has_transparency):
        return 8, 0.8  # to RGBA, then pasted onto a white RGB canvas
    if mode in HIGH_DEPTH:
        return canvas_bytes_per_pixel(mode) + 1 + 4, 0.6  # samples as an array, 8-bit gray, RGB
    return 4, 0.3  # one convert("RGB")


@dataclass(frozen=True)
class Cost:
    memory: int  # bytes, peak (every buffer counted as live at once: an upper bound)
    work: float  # full-scale baseline JPEG pixels

    @property
    def memory_mb(self) -> float:
        return self.memory / 1e6


@dataclass(frozen=True)
class ImageFacts:
    """What the header says: enough to price the decode without decoding."""

    format: str
    mode: str
    width: int  # declared canvas
    height: int
    decoded_width: int  # after the JPEG decoder's reduced scale, else the canvas
    decoded_height: int
    variant: str = ""  # what changes the decoder's work per pixel: "lossless" (WebP), "interlaced" (PNG)
    rotated: bool = False  # the EXIF orientation asks for a transpose (or may: a PNG's eXIf after its pixels)
    has_transparency: bool = False
    raw_bytes_per_pixel: float = 3.0  # PNG / TIFF samples as stored, before Pillow unpacks them
    jpeg_samples: int = 0  # JPEG: full-scale samples over all components
    jpeg_scans: int = 1
    buffer_bytes: int = 0  # TIFF: the decoder's strip or tile buffer
    decoded_area: int = 0  # TIFF: pixels the decoder produces (whole tiles), when more than the canvas

    @property
    def decoded_pixels(self) -> int:
        return self.decoded_width * self.decoded_height

    def describe(self) -> str:
        kind = f"{self.width}x{self.height} {self.format} ({self.mode}"
        if self.format in ("JPEG", "MPO") and self.jpeg_scans > 1:
            kind += f", {self.jpeg_scans} scans"
        if self.rotated:
            kind += ", EXIF-rotated"
        return kind + ")"


def estimate(facts: ImageFacts) -> Cost:
    """The price of decoding `facts`' image and bringing it to the model's input, step by step."""
    pixels = facts.decoded_pixels
    canvas = pixels * canvas_bytes_per_pixel(facts.mode)
    memory = canvas + pixels * _DECODER_BYTES_PER_PIXEL.get(facts.format, 0) + facts.buffer_bytes
    produced = max(pixels, facts.decoded_area)
    if facts.format in ("JPEG", "MPO"):
        work = facts.jpeg_samples * (_JPEG_PER_SAMPLE + _JPEG_PER_SAMPLE_SCAN * facts.jpeg_scans)
        work += pixels * _JPEG_PER_DECODED_PIXEL
        if facts.jpeg_scans > 1:
            memory += facts.jpeg_samples * _JPEG_COEFFICIENT_BYTES
    elif (facts.format, facts.variant) in _WORK_PER_RAW_BYTE:
        work = produced * facts.raw_bytes_per_pixel * _WORK_PER_RAW_BYTE[facts.format, facts.variant]
    else:
        work = produced * _WORK_PER_PIXEL.get((facts.format, facts.variant), 1.0)
    if facts.rotated:
        memory += canvas
        work += pixels * _TRANSPOSE_WORK
    convert_bytes, convert_work = _conversion(facts.mode, facts.has_transparency)
    memory += pixels * convert_bytes
    work += pixels * (convert_work + _RESIZE_WORK) + memory * _TOUCH_WORK_PER_BYTE
    return Cost(memory=memory, work=work)


def reference_photo(megapixels: float) -> ImageFacts:
    """A baseline 4:2:0 RGB JPEG photo of `megapixels`, decoded at full scale, EXIF-rotated."""
    width = math.isqrt(int(megapixels * 1e6 * 4 / 3))
    height = width * 3 // 4
    return ImageFacts(
        format="JPEG",
        mode="RGB",
        width=width,
        height=height,
        decoded_width=width,
        decoded_height=height,
        rotated=True,
        jpeg_samples=width * height * 3 // 2,
    )


@dataclass(frozen=True)
class DecodeBudget:
    """The most one upload may cost: what a `megapixels` photo costs (API_DECODE_BUDGET_MP)."""

    megapixels: float

    @property
    def allowance(self) -> Cost:
        return estimate(reference_photo(self.megapixels))

    def check(self, facts: ImageFacts) -> Cost:
        """The image's price, or ImageTooLarge (413) saying what it would cost and what would pass."""
        cost = estimate(facts)
        allowance = self.allowance
        if cost.memory <= allowance.memory and cost.work <= allowance.work:
            return cost
        # Cost grows about linearly with the pixels: this much of the canvas would pass.
        share = min(allowance.memory / cost.memory, allowance.work / cost.work)
        passing_mp = facts.width * facts.height * share / 1e6
        raise ImageTooCostly(
            f"this {facts.describe()} image would need about {cost.memory_mb:.0f} MB and "
            f"{cost.work / allowance.work:.1f}x the work of the per-image budget to decode; the budget is what a "
            f"{self.megapixels:g} MP photo costs ({allowance.memory_mb:.0f} MB; API_DECODE_BUDGET_MP): "
            f"downscale it to about {passing_mp:.1f} MP or less, or send it as a baseline JPEG",
        )
