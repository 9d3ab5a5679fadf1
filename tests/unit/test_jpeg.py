"""The common JPEG's decode (libjpeg-turbo into an array) gives Pillow's pixels; the rest stays Pillow's."""

from __future__ import annotations

import io

import numpy as np
import pytest
import skimage.data
from PIL import Image

from api.engine.images.decode import decode_image
from api.errors import InvalidImage
from tests.support import DECODE_BUDGET

LIMIT = 50_000_000
PHOTOS = {"chelsea": skimage.data.chelsea, "astronaut": skimage.data.astronaut, "coffee": skimage.data.coffee}


def encode(image: Image.Image, fmt: str = "JPEG", **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def pillow_pixels(data: bytes, reduce_to: int | None) -> np.ndarray:
    """Pillow's own decode, with its draft where decode_image asks for one."""
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        if reduce_to and min(width, height) >= 2 * reduce_to:
            scale = reduce_to / min(width, height)
            image.draft("RGB", (int(np.ceil(width * scale)), int(np.ceil(height * scale))))
        image.load()
        return np.asarray(image.convert("RGB"))


@pytest.mark.parametrize("photo", sorted(PHOTOS))
@pytest.mark.parametrize("subsampling", [0, 1, 2], ids=["444", "422", "420"])
@pytest.mark.parametrize("progressive", [False, True], ids=["baseline", "progressive"])
def test_the_fast_decode_gives_pillows_pixels(photo: str, subsampling: int, progressive: bool) -> None:
    # odd sizes, enlarged so that each reduced scale Pillow drafts (1/2, 1/4, 1/8) is taken
    source = Image.fromarray(PHOTOS[photo]()).resize((1901, 1267), Image.Resampling.LANCZOS)
    data = encode(source, quality=90, subsampling=subsampling, progressive=progressive)
    for reduce_to in (None, 600, 300, 150):
        decoded = decode_image(data, max_pixels=LIMIT, reduce_to=reduce_to, budget=DECODE_BUDGET)
        assert isinstance(decoded.source, np.ndarray), "the common JPEG takes the fast decode"
        expected = pillow_pixels(data, reduce_to)
        assert decoded.size == (expected.shape[1], expected.shape[0])
        np.testing.assert_array_equal(decoded.pixels, expected)
        assert (decoded.width, decoded.height) == (1901, 1267)  # the canvas, before the reduced decode


def test_an_mpo_decodes_its_first_image_as_pillow_does() -> None:
    first = Image.fromarray(skimage.data.chelsea())
    second = first.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    data = encode(first, "MPO", save_all=True, append_images=[second], quality=90)
    decoded = decode_image(data, max_pixels=LIMIT, budget=DECODE_BUDGET)
    assert decoded.format == "MPO" and isinstance(decoded.source, np.ndarray)
    np.testing.assert_array_equal(decoded.pixels, pillow_pixels(data, None))


def turned(image: Image.Image) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    return encode(image, quality=90, exif=exif.tobytes())


@pytest.mark.parametrize(
    "name, data",
    [
        ("grey", encode(Image.fromarray(skimage.data.camera()), quality=90)),
        ("cmyk", encode(Image.fromarray(skimage.data.chelsea()).convert("CMYK"), quality=90)),
        ("exif turn", turned(Image.fromarray(skimage.data.chelsea()))),
    ],
)
def test_what_the_fast_decode_does_not_take_pillow_decodes(name: str, data: bytes) -> None:
    decoded = decode_image(data, max_pixels=LIMIT, budget=DECODE_BUDGET)
    assert isinstance(decoded.source, Image.Image), name
    assert decoded.image.mode == "RGB"
    if name == "exif turn":  # 451 wide, 300 high, shown turned
        assert decoded.size == (300, 451)


@pytest.mark.parametrize("keep", [0.3, 0.6, 0.95])
def test_a_truncated_jpeg_is_refused_as_pillow_refuses_it(keep: float) -> None:
    data = encode(Image.fromarray(skimage.data.chelsea()), quality=90)
    with pytest.raises(InvalidImage, match="truncated"):
        decode_image(data[: int(len(data) * keep)], max_pixels=LIMIT, budget=DECODE_BUDGET)
