"""Reduced-scale JPEG decoding keeps the top-1 class of real photos (the demo model's real weights)."""

from __future__ import annotations

from PIL import Image

from api.engine.images.decode import decode_image
from tests.helpers import jpeg_bytes, load_model, scores_of
from tests.support import DECODE_BUDGET

LIMIT = 50_000_000  # as tests/unit/test_preprocess.py


def test_reduced_decode_keeps_top1_on_real_photos(demo_dir, chelsea: Image.Image) -> None:  # type: ignore[no-untyped-def]
    """Big JPEGs decoded at reduced scale (never below the resize target) classify the same."""
    import skimage.data

    classifier = load_model(demo_dir, device="cpu")
    target = classifier.resize_short_side
    photos = [chelsea, Image.fromarray(skimage.data.coffee()), Image.fromarray(skimage.data.astronaut())]
    for photo in photos:
        big = photo.resize((photo.width * 6, photo.height * 6), Image.Resampling.BICUBIC)
        data = jpeg_bytes(big)
        full = decode_image(data, max_pixels=LIMIT, budget=DECODE_BUDGET)
        reduced = decode_image(data, max_pixels=LIMIT, reduce_to=target, budget=DECODE_BUDGET)
        assert min(reduced.image.size) >= target and reduced.image.size < full.image.size
        assert (reduced.width, reduced.height) == (full.width, full.height)  # reports the original size
        scores = scores_of(classifier, full.image, reduced.image)
        assert int(scores[0].argmax()) == int(scores[1].argmax())
