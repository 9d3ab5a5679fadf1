"""Preprocessing follows the architecture's data config; decoding is decided from the bytes."""

from __future__ import annotations

import dataclasses
import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import Compose

from api.engine.images.decode import decode_image, to_rgb
from api.engine.model.preprocess import build_transform
from api.errors import ImageTooLarge, InvalidImage, UnsupportedMediaType
from tests.helpers import jpeg_bytes, png_bytes, tiny_model
from tests.support import DECODE_BUDGET

LIMIT = 50_000_000


def test_transform_follows_test_resnet_data_config() -> None:
    transform, config = build_transform(tiny_model("test_resnet"), image_size=None)
    assert tuple(config["input_size"]) == (3, 160, 160)
    assert config["crop_pct"] == pytest.approx(0.95)
    assert tuple(config["mean"]) == (0.5, 0.5, 0.5) and tuple(config["std"]) == (0.5, 0.5, 0.5)
    white = Image.new("RGB", (300, 200), (255, 255, 255))
    tensor = transform(white)
    assert tensor.shape == (3, 160, 160)
    torch.testing.assert_close(tensor, torch.ones_like(tensor))  # (1 - 0.5) / 0.5


def test_image_size_setting_overrides_only_the_size() -> None:
    transform, config = build_transform(tiny_model("test_resnet"), image_size=224)
    assert tuple(config["input_size"]) == (3, 224, 224)
    assert config["crop_pct"] == pytest.approx(0.95)
    assert transform(Image.new("RGB", (500, 400))).shape == (3, 224, 224)


def test_real_architecture_config_resnet50() -> None:
    import timm

    with torch.device("meta"):
        model = timm.create_model("resnet50", pretrained=False, num_classes=67)
    _, config = build_transform(model, image_size=None)
    assert tuple(config["input_size"]) == (3, 224, 224)
    assert config["interpolation"] == "bicubic"
    assert tuple(config["mean"]) == pytest.approx((0.485, 0.456, 0.406))


def test_exif_orientation_is_applied(chelsea: Image.Image) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": stored landscape, shown portrait
    decoded = decode_image(jpeg_bytes(chelsea, exif=exif.tobytes()), max_pixels=LIMIT, budget=DECODE_BUDGET)
    assert decoded.image.size == (300, 451)


@pytest.mark.parametrize("mode", ["L", "1", "P", "CMYK", "LA", "RGBA", "I;16", "I", "F", "YCbCr"])
def test_every_mode_becomes_8bit_rgb(mode: str) -> None:
    gradient = np.tile(np.linspace(0, 1, 64), (32, 1))
    if mode in ("I;16", "I"):
        image = Image.fromarray((gradient * 65535).astype(np.uint16 if mode == "I;16" else np.int32))
        if mode == "I":
            image = image.convert("I")
    elif mode == "F":
        image = Image.fromarray(gradient.astype(np.float32), mode="F")
    else:
        image = Image.fromarray((gradient * 255).astype(np.uint8)).convert(mode)
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == (64, 32)
    row = np.asarray(rgb)[0, :, 0].astype(int)
    if mode != "1":  # a 1-bit image is only black and white
        assert row[0] < 20 and row[-1] > 235, f"{mode}: range squashed to {row[0]}..{row[-1]}"


def test_transparency_is_composited_on_white() -> None:
    clear = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert to_rgb(clear).getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (b"", InvalidImage),
        (b"hello, this is text", UnsupportedMediaType),
        (b"<svg xmlns='http://www.w3.org/2000/svg'><rect width='10' height='10'/></svg>", UnsupportedMediaType),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n", UnsupportedMediaType),
        (b"PK\x03\x04" + b"\x00" * 40, UnsupportedMediaType),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 20, InvalidImage),  # JPEG magic, corrupt header
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 30, InvalidImage),
    ],
)
def test_non_images_and_corrupt_headers(payload: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        decode_image(payload, max_pixels=LIMIT, budget=DECODE_BUDGET)


@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.9])
def test_truncated_jpeg_is_invalid(chelsea_jpeg: bytes, fraction: float) -> None:
    with pytest.raises(InvalidImage):
        decode_image(chelsea_jpeg[: int(len(chelsea_jpeg) * fraction)], max_pixels=LIMIT, budget=DECODE_BUDGET)


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    # One tiny compressed row: a decoder that trusted the header would allocate width*height*3 bytes.
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")
    )


def test_gigantic_canvas_is_refused_from_the_header() -> None:
    bomb = _png_header_only(100_000, 100_000)
    assert len(bomb) < 200
    with pytest.raises(ImageTooLarge, match=r"10000000000 pixels.*API_MAX_IMAGE_PIXELS"):
        decode_image(bomb, max_pixels=LIMIT, budget=DECODE_BUDGET)


def test_pixel_limit_is_the_setting(chelsea_jpeg: bytes) -> None:
    with pytest.raises(ImageTooLarge, match="API_MAX_IMAGE_PIXELS"):
        decode_image(chelsea_jpeg, max_pixels=451 * 300 - 1, budget=DECODE_BUDGET)
    assert decode_image(chelsea_jpeg, max_pixels=451 * 300, budget=DECODE_BUDGET).width == 451


def test_formats_from_bytes_not_names(chelsea: Image.Image) -> None:
    for fmt in ("PNG", "WEBP", "BMP", "TIFF", "GIF"):
        buffer = io.BytesIO()
        chelsea.save(buffer, format=fmt)
        decoded = decode_image(buffer.getvalue(), max_pixels=LIMIT, budget=DECODE_BUDGET)
        assert decoded.format == fmt and decoded.image.mode == "RGB"


def test_small_images_and_pngs_are_not_reduced(chelsea: Image.Image) -> None:
    small = decode_image(jpeg_bytes(chelsea), max_pixels=LIMIT, reduce_to=256, budget=DECODE_BUDGET)
    assert small.image.size == (451, 300)
    big_png = io.BytesIO()
    chelsea.resize((1804, 1200)).save(big_png, format="PNG")
    assert decode_image(big_png.getvalue(), max_pixels=LIMIT, reduce_to=256, budget=DECODE_BUDGET).image.size == (
        1804,
        1200,
    )


def _resnet50_split():  # type: ignore[no-untyped-def]
    import timm

    from api.engine.model.preprocess import split_transform

    with torch.device("meta"):
        model = timm.create_model("resnet50", pretrained=False)
    transform, _ = build_transform(model, image_size=None)
    return transform, split_transform(transform)


@pytest.mark.parametrize(
    "size", [(451, 300), (300, 451), (224, 224), (235, 235), (4000, 3000), (1000, 235), (3290, 235), (11_000, 800)]
)
def test_ordinary_shapes_get_timms_exact_pixels(chelsea: Image.Image, size: tuple[int, int]) -> None:
    """Photos and panoramas up to about 15:1 go through timm's own resize and crop, bit for bit."""
    transform, split = _resnet50_split()
    image = chelsea.resize(size, Image.Resampling.BILINEAR)
    expected = np.asarray(Compose(transform.transforms[:2])(image))
    np.testing.assert_array_equal(split.pixels(image), expected)


@pytest.mark.parametrize("size", [(8000, 300), (300, 8000), (20_000, 240)])
def test_extreme_shapes_resize_only_the_crop_and_agree_with_timm(chelsea: Image.Image, size: tuple[int, int]) -> None:
    """Past the exact limit only the cropped region is resized: the same image to rounding."""
    from api.engine.images.recipe import EXACT_RESIZE_LIMIT

    transform, split = _resnet50_split()
    image = chelsea.resize(size, Image.Resampling.BILINEAR)
    width, height = split.resized_size(image.width, image.height)
    assert width * height > EXACT_RESIZE_LIMIT * 224 * 224  # this shape takes the bounded path
    expected = np.asarray(Compose(transform.transforms[:2])(image)).astype(int)
    got = split.pixels(image).astype(int)
    assert got.shape == expected.shape == (224, 224, 3)
    assert np.abs(got - expected).max() <= 2 and np.abs(got - expected).mean() < 0.1


def test_a_50000x1_strip_costs_what_its_crop_costs() -> None:
    """The strip the issue found: scaled up, its resized image would be 11,750,000 x 235 pixels."""
    _, split = _resnet50_split()
    strip = Image.new("RGB", (50_000, 1), (200, 30, 30))
    assert split.resized_size(strip.width, strip.height) == (11_750_000, 235)
    pixels = split.pixels(strip)
    assert pixels.shape == (224, 224, 3) and (pixels == (200, 30, 30)).all()


def test_budget_allows_a_photo_and_refuses_from_the_header(chelsea: Image.Image) -> None:
    from api.engine.images.budget import DecodeBudget, ImageFacts, estimate, reference_photo

    budget = DecodeBudget(22)
    assert budget.check(reference_photo(12)).memory < budget.allowance.memory
    # cost grows with what the decoder would allocate: mode, decoder buffers, rotation, scans
    plain = ImageFacts("PNG", "RGB", 4000, 3000, 4000, 3000)
    assert estimate(ImageFacts("PNG", "RGBA", 4000, 3000, 4000, 3000)).memory > estimate(plain).memory
    assert estimate(ImageFacts("PNG", "RGB", 4000, 3000, 4000, 3000, rotated=True)).memory > estimate(plain).memory
    assert estimate(ImageFacts("WEBP", "RGB", 4000, 3000, 4000, 3000)).memory > estimate(plain).memory
    scans = ImageFacts("JPEG", "L", 4000, 3000, 500, 375, jpeg_samples=12_000_000, jpeg_scans=2000)
    with pytest.raises(ImageTooLarge, match=r"2000 scans.*API_DECODE_BUDGET_MP"):
        budget.check(scans)
    with pytest.raises(ImageTooLarge, match="MP or less"):
        decode_image(png_bytes(Image.new("RGBA", (5000, 5000), (1, 2, 3, 4))), max_pixels=LIMIT, budget=DecodeBudget(5))
    assert decode_image(jpeg_bytes(chelsea), max_pixels=LIMIT, budget=DecodeBudget(1)).width == 451


def test_alpha_is_composited_as_before(chelsea: Image.Image) -> None:
    """One RGB canvas pasted through the alpha mask: the pixels alpha_composite onto white gave."""
    rgba = chelsea.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(chelsea.size))
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    expected = np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    np.testing.assert_array_equal(np.asarray(to_rgb(rgba)), expected)


def test_client_decoded_pixels_are_checked_then_prepared_as_the_file(chelsea_jpeg: bytes) -> None:
    """The v2 pixels model's input: a photo's own pixels give the model input its file gives; the
    canvas limit and the decode budget hold for pixels as for files."""
    from api.config import Settings
    from api.engine.images.budget import DecodeBudget
    from api.engine.images.decode import check_pixels
    from api.engine.serving.pipeline import prepare_upload

    _, split = _resnet50_split()
    options = Settings(_env_file=None).batching_group  # type: ignore[call-arg]
    _, from_file, _ = prepare_upload(chelsea_jpeg, split, options, reduce_to=None)
    pixels = np.asarray(Image.open(io.BytesIO(chelsea_jpeg)).convert("RGB"))
    info, from_pixels, resize = prepare_upload(pixels, split, options, reduce_to=224)
    np.testing.assert_array_equal(from_pixels, from_file)
    assert (info.width, info.height, info.format, resize) == (451, 300, "RGB8", False)
    # for an engine that resizes (a GPU's), the file's decoded pixels and the client's ship alike
    _, shipped_file, _ = prepare_upload(chelsea_jpeg, split, options, reduce_to=None, ship_decoded_bytes=10**6)
    _, shipped, resize = prepare_upload(pixels, split, options, reduce_to=None, ship_decoded_bytes=10**6)
    assert resize and shipped.shape == (300, 451, 3)
    np.testing.assert_array_equal(shipped, shipped_file)
    with pytest.raises(ImageTooLarge, match="API_MAX_IMAGE_PIXELS"):
        prepare_upload(pixels, split, dataclasses.replace(options, max_image_pixels=451 * 300 - 1), reduce_to=None)
    canvas = np.zeros((5000, 5000, 3), np.uint8)  # zero pages: priced, never touched
    with pytest.raises(ImageTooLarge, match="MP or less"):
        check_pixels(canvas, max_pixels=LIMIT, budget=DecodeBudget(5))
    assert (
        check_pixels(np.zeros((3000, 4000, 3), np.uint8), max_pixels=LIMIT, budget=DECODE_BUDGET).memory > 0
    )  # 12 MP passes


def test_an_image_of_the_crops_size_is_prepared_by_the_front_end_not_shipped() -> None:
    """The engine tells a model input from a shipped image by its size, so an upload exactly the crop's
    size (224 x 224 for resnet50, whose recipe still resizes it to 235 and crops) is never shipped."""
    from api.config import Settings
    from api.engine.serving.pipeline import prepare_upload

    _, split = _resnet50_split()
    options = Settings(_env_file=None).batching_group  # type: ignore[call-arg]
    crop_h, crop_w = split.crop
    for height, width, shipped in ((crop_h, crop_w, False), (crop_h + 1, crop_w, True)):
        pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
        _, prepared, resize = prepare_upload(pixels, split, options, reduce_to=None, ship_decoded_bytes=10**6)
        assert resize == shipped
        if not shipped:
            assert prepared.shape == (crop_h, crop_w, 3)
            assert not np.array_equal(prepared, pixels)  # resized to 235 and cropped, not taken as it is
