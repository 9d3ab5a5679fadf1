"""Adversarial uploads, and the cost of decoding + preprocessing each, measured in a fresh process.

Every step of the decode path has its own way to turn a small file into a large cost: the canvas
(declared size times the mode's bytes per pixel), the decoder's own buffers (libwebp's canvases, a
progressive JPEG's coefficients, a TIFF tile declared larger than the image), the number of scans,
EXIF rotation, mode conversion, the resize (an extreme aspect ratio scales the short side *up*),
and multi-frame files. `corpus()` holds one or more files aimed at each, most of them a few
hundred bytes to a few hundred kB; `measure()` runs the service's own decode + preprocessing for
one file in a process forked for it and reports its CPU time and peak memory above the starting
point. The bound the tests hold every file to is twice what the reference costs, measured the same
way: a 12-megapixel phone photo (baseline JPEG, EXIF-rotated) decoded at full scale.

    python -m tests.adversarial      # the table: every file's cost against the reference
"""

from __future__ import annotations

import functools
import io
import multiprocessing
import resource
import struct
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

REFERENCE = "reference_12mp_phone_photo.jpg"
BOUND = 2.0  # times the reference, in CPU time and in peak memory


def _save(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _rotated(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def photo(width: int, height: int) -> Image.Image:
    """A photo-like image: skimage's astronaut scaled up, with sensor-like noise (JPEGs stay realistic)."""
    import skimage.data

    base = Image.fromarray(skimage.data.astronaut()).resize((width, height), Image.Resampling.BICUBIC)
    noise = np.random.default_rng(0).integers(-6, 7, size=(height, width, 3), dtype=np.int16)
    return Image.fromarray((np.asarray(base, dtype=np.int16) + noise).clip(0, 255).astype(np.uint8))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_ztxt_flood(chunks: int) -> bytes:
    """A small PNG whose text chunks each inflate a few hundred bytes into 1 MB."""
    png = _save(Image.new("RGB", (64, 64), (120, 80, 40)), "PNG")
    text = _png_chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(b"A" * (1024 * 1024 - 1024), 9))
    at = png.index(b"IDAT") - 4
    return png[:at] + text * chunks + png[at:]


def _bmp_rle8(width: int, height: int) -> bytes:
    """An RLE8 BMP declaring a huge canvas with a few bytes of pixel data."""
    palette = b"".join(struct.pack("<BBBB", i, i, i, 0) for i in range(256))
    pixels = b"\x00\x01"  # end of bitmap: every pixel left at index 0
    offset = 14 + 40 + len(palette)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(pixels), 2835, 2835, 256, 0)
    header = b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset)
    return header + info + palette + pixels


def _progressive_scan_flood(scans: int) -> bytes:
    """A progressive JPEG whose last scan is repeated: libjpeg revisits every coefficient each time."""
    data = _save(Image.new("L", (4000, 3000), 128), "JPEG", progressive=True, quality=90)
    last = data.rindex(b"\xff\xda")
    scan = data[last:-2]  # SOS header + entropy data, before EOI
    return data[:-2] + scan * scans + b"\xff\xd9"


def _tiff(array: np.ndarray, **options: object) -> bytes:
    import tifffile

    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, **options)
    return buffer.getvalue()


def _frames(fmt: str, count: int, size: tuple[int, int], **options: object) -> bytes:
    frames = [Image.new("RGB", size, (i % 256, 90, 200 - i % 200)) for i in range(count)]
    return _save(frames[0], fmt, save_all=True, append_images=frames[1:], **options)


def corpus() -> dict[str, bytes]:
    """name -> file bytes. Deterministic; a few seconds to build (the 12 MP files dominate)."""
    twelve = photo(4000, 3000)
    files: dict[str, Callable[[], bytes]] = {
        REFERENCE: lambda: _save(twelve, "JPEG", quality=90, exif=_rotated(6)),
        # --- ordinary large photos, every format the service accepts
        "photo_12mp.jpg": lambda: _save(twelve, "JPEG", quality=90),
        "photo_12mp_progressive.jpg": lambda: _save(twelve, "JPEG", quality=90, progressive=True),
        "photo_12mp.png": lambda: _save(twelve, "PNG"),
        "photo_12mp_rotated.png": lambda: _save(twelve, "PNG", exif=_rotated(8)),
        "photo_12mp_interlaced.png": lambda: _save(twelve, "PNG", interlace=True),
        "photo_12mp.avif": lambda: _save(twelve, "AVIF", quality=60, speed=10),
        "photo_7mp.webp": lambda: _save(twelve.resize((3000, 2250)), "WEBP", quality=90),
        "photo_12mp.webp": lambda: _save(twelve, "WEBP", quality=90),
        "photo_5mp_lossless.webp": lambda: _save(twelve.resize((2600, 1950)), "WEBP", lossless=True),
        "photo_12mp_deflate.tif": lambda: _save(twelve, "TIFF", compression="tiff_adobe_deflate"),
        "photo_12mp_cmyk.jpg": lambda: _save(twelve.convert("CMYK"), "JPEG", quality=90),
        "photo_50mp.jpg": lambda: _save(photo(8160, 6120), "JPEG", quality=85),
        # --- extreme aspect ratios: the resize scales the short side up to the model's size
        "strip_50000x1.png": lambda: _save(Image.new("RGB", (50_000, 1), (200, 30, 30)), "PNG"),
        "strip_1x50000.png": lambda: _save(Image.new("L", (1, 50_000), 77), "PNG"),
        "strip_25000x2_rotated.jpg": lambda: _save(Image.new("RGB", (25_000, 8), 9), "JPEG", exif=_rotated(6)),
        "strip_40000x3.gif": lambda: _save(Image.new("P", (40_000, 3), 3), "GIF"),
        "panorama_12000x600.jpg": lambda: _save(photo(12_000, 600), "JPEG", quality=85),
        # --- the whole canvas allowed (API_MAX_IMAGE_PIXELS) in a few hundred bytes, in costly modes
        "bilevel_7000x7000.png": lambda: _save(Image.new("1", (7000, 7000), 1), "PNG"),
        "palette_7000x7000.gif": lambda: _save(Image.new("P", (7000, 7000), 5), "GIF"),
        "gray16_7000x7000.png": lambda: _save(Image.new("I;16", (7000, 7000), 40_000), "PNG"),
        "rgba_7000x7000.png": lambda: _save(Image.new("RGBA", (7000, 7000), (1, 2, 3, 4)), "PNG"),
        "float_5000x5000.tif": lambda: _tiff(np.full((5000, 5000), 0.5, np.float32), compression="zlib"),
        "constant_7000x7000.jpg": lambda: _save(Image.new("RGB", (7000, 7000), 50), "JPEG", exif=_rotated(6)),
        "constant_7000x7000.webp": lambda: _save(Image.new("RGB", (7000, 7000), 50), "WEBP", quality=1, method=0),
        "bmp_rle8_7000x7000.bmp": lambda: _bmp_rle8(7000, 7000),
        # --- costly modes at ordinary sizes: accepted, priced per mode
        "gray16_4000x3000.png": lambda: _save(Image.fromarray(np.asarray(twelve.convert("L"), np.uint16) * 257), "PNG"),
        "rgba_4000x3000.png": lambda: _save(twelve.convert("RGBA"), "PNG"),
        "palette_alpha_4000x3000.png": lambda: _save(twelve.convert("P"), "PNG", transparency=0),
        "float_3000x3000.tif": lambda: _tiff(np.random.default_rng(1).random((3000, 3000), np.float32)),
        "rgb16_3000x2000.tif": lambda: _tiff(np.full((2000, 3000, 3), 30_000, np.uint16), compression="zlib"),
        # --- the decoder's own buffers and passes
        "tiff_tile_8192_for_64x64.tif": lambda: _tiff(
            np.zeros((64, 64, 3), np.uint8), tile=(8192, 8192), compression="zlib"
        ),
        "progressive_2000_scans.jpg": lambda: _progressive_scan_flood(2000),
        "png_ztxt_flood.png": lambda: _png_ztxt_flood(200),
        # --- multi-frame files: only the first frame is ever decoded
        "gif_500_frames.gif": lambda: _frames("GIF", 500, (800, 600)),
        "apng_300_frames.png": lambda: _frames("PNG", 300, (800, 600)),
        "webp_200_frames.webp": lambda: _frames("WEBP", 200, (800, 600), quality=50),
        "tiff_200_pages.tif": lambda: _frames("TIFF", 200, (800, 600), compression="tiff_lzw"),
    }
    return {name: make() for name, make in files.items()}


# --- measuring one file in a fresh process ---------------------------------------------------------


@dataclass(frozen=True)
class Measured:
    name: str
    size: int  # file bytes
    cpu_s: float  # user + system, every thread
    peak_mb: float  # peak resident memory above the process's own before decoding
    outcome: str  # "ok", or the refusal's status and code


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field))


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@functools.cache
def _split(model_name: str):  # type: ignore[no-untyped-def]
    import timm
    import torch

    from api.engine.model.preprocess import build_transform, split_transform

    with torch.device("meta"):
        model = timm.create_model(model_name, pretrained=False)
    transform, config = build_transform(model, image_size=None)
    short_side = int(config["input_size"][-1] / config["crop_pct"])
    return split_transform(transform), short_side


def _decode_and_prepare(data: bytes, reduced: bool, model_name: str) -> tuple[float, float, str]:
    import gc

    from api.config import Settings
    from api.engine.images.budget import DecodeBudget
    from api.engine.images.decode import _open_formats, decode_image
    from api.errors import RequestError

    settings = Settings(_env_file=None)  # the service's defaults: pixel limit, decode budget
    split, short_side = _split(model_name)
    _open_formats()  # Pillow registers its plugins once per process, on the first image
    gc.collect()
    before_kb = _status_kb("VmRSS:")
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # the peak (VmHWM) starts again from the current resident size
    started = _cpu()
    outcome = "ok"
    try:
        decoded = decode_image(
            data,
            max_pixels=settings.max_image_pixels,
            reduce_to=short_side if reduced else None,
            budget=DecodeBudget(settings.decode_budget_mp),
        )
        pixels = split.pixels(decoded.image)
        assert pixels.shape[-1] == 3 and pixels.dtype == np.uint8
    except RequestError as error:
        outcome = f"{error.status} {error.code}"
    cpu_s = _cpu() - started
    return cpu_s, (_status_kb("VmHWM:") - before_kb) / 1024, outcome


def _context() -> multiprocessing.context.BaseContext:
    context = multiprocessing.get_context("forkserver")
    # imported once in the fork server, so each measured child starts warm but fresh
    context.set_forkserver_preload(["api.engine.model.preprocess", "api.config", "tests.adversarial", "timm"])
    return context


def measure(name: str, data: bytes, *, reduced: bool = True, model_name: str = "resnet50") -> Measured:
    """Decode + preprocess `data` as the service does, in a process of its own."""
    with _context().Pool(1, maxtasksperchild=1) as pool:
        cpu_s, peak_mb, outcome = pool.apply(_decode_and_prepare, (data, reduced, model_name))
    return Measured(name, len(data), cpu_s, peak_mb, outcome)


def least(runs: list[Measured]) -> Measured:
    """The least CPU time and peak of a few runs of one file: the estimate least disturbed by the
    rest of a shared machine (the same for the reference and every file)."""
    return Measured(
        runs[0].name, runs[0].size, min(r.cpu_s for r in runs), min(r.peak_mb for r in runs), runs[-1].outcome
    )


def reference(files: dict[str, bytes], repeats: int = 3) -> Measured:
    """The reference photo at full scale (no reduced decode), in a few fresh processes."""
    return least([measure(REFERENCE, files[REFERENCE], reduced=False) for _ in range(repeats)])


def table(rows: list[Measured], ref: Measured) -> str:
    lines = [f"{'file':34s} {'bytes':>10s} {'cpu ms':>8s} {'x ref':>6s} {'peak MB':>8s} {'x ref':>6s}  outcome"]
    for row in [ref, *rows]:
        lines.append(
            f"{row.name:34s} {row.size:10d} {row.cpu_s * 1000:8.1f} {row.cpu_s / ref.cpu_s:6.2f} "
            f"{row.peak_mb:8.1f} {row.peak_mb / ref.peak_mb:6.2f}  {row.outcome}"
        )
    return "\n".join(lines)


def main() -> None:
    started = time.perf_counter()
    files = corpus()
    ref = reference(files)
    rows = [measure(name, data) for name, data in files.items()]
    sys.stdout.write(table(rows, ref) + "\n")
    worst_cpu = max(rows, key=lambda r: r.cpu_s)
    worst_mem = max(rows, key=lambda r: r.peak_mb)
    sys.stdout.write(
        f"reference: {REFERENCE} at full scale, {ref.cpu_s * 1000:.0f} ms, {ref.peak_mb:.0f} MB; "
        f"worst CPU {worst_cpu.name} {worst_cpu.cpu_s / ref.cpu_s:.2f}x, "
        f"worst memory {worst_mem.name} {worst_mem.peak_mb / ref.peak_mb:.2f}x "
        f"(bound {BOUND:g}x); {time.perf_counter() - started:.0f}s\n"
    )


if __name__ == "__main__":
    main()
