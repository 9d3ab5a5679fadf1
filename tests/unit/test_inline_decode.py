"""Which uploads a front-end decodes on its event loop: a small, cheap JPEG (opened and priced there
first); a costlier JPEG is opened there and decoded in the pool; anything else goes to the pool whole."""

from __future__ import annotations

import io
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from PIL import Image

from api.config import Settings
from api.errors import InvalidImage
from api.remote.frontend.link import INLINE_BYTES, INLINE_WORK, EngineLink
from tests.helpers import jpeg_bytes, png_bytes


class _Quiet:
    def on_stage(self, stage: str, seconds: float) -> None:
        pass


@pytest.fixture
def link() -> Any:
    options = Settings(_env_file=None).batching_group  # type: ignore[call-arg]
    link = EngineLink(options, 1, _Quiet(), stall_s=5.0)  # type: ignore[arg-type]
    yield link
    link._decoder.shutdown()


VIEW = SimpleNamespace(reduce_to=235)  # resnet50's resize target


def test_a_small_photo_is_decoded_on_the_event_loop(link: Any, chelsea: Image.Image, chelsea_jpeg: bytes) -> None:
    opened = link._open_small_jpeg(VIEW, chelsea_jpeg)
    assert opened is not None and opened.cost.work <= INLINE_WORK
    np.testing.assert_array_equal(opened.decode().pixels, np.asarray(Image.open(io.BytesIO(chelsea_jpeg))))


def test_a_costlier_jpeg_is_opened_here_and_decoded_in_the_pool(link: Any, chelsea: Image.Image) -> None:
    data = jpeg_bytes(chelsea.resize((1600, 1066)))
    assert len(data) <= INLINE_BYTES
    opened = link._open_small_jpeg(VIEW, data)
    assert opened is not None and opened.cost.work > INLINE_WORK
    assert opened.image.size == (400, 267)  # priced at the reduced scale it will be decoded at


def test_other_uploads_go_to_the_pool_whole(link: Any, chelsea: Image.Image) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (1200, 1600, 3), dtype=np.uint8)
    large = jpeg_bytes(Image.fromarray(noise))
    assert len(large) > INLINE_BYTES
    for upload in (png_bytes(chelsea), large, np.asarray(chelsea)):
        assert link._open_small_jpeg(VIEW, upload) is None


def test_a_broken_small_jpeg_is_refused_where_it_is_opened(link: Any, chelsea_jpeg: bytes) -> None:
    with pytest.raises(InvalidImage):
        link._open_small_jpeg(VIEW, chelsea_jpeg[:200])
