"""What serves predictions, in types that need no torch.

Two things answer `classify(ticket, uploads)` the same way: `api.engine.serving.service.Engine` (the model
in this process) and `api.remote.frontend.link.EngineLink` (a front-end process's connection to the engine
process, api/remote/host/host.py). The HTTP routes, readiness and the CLI see only `Pipeline`, so a
front-end process never imports torch (tests/reliability/test_frontends.py proves it).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Protocol

import numpy as np
from PIL import Image

from api.config import BatchingSettings
from api.engine.images import fast_resize
from api.engine.images.budget import DecodeBudget
from api.engine.images.decode import PIXELS_FORMAT, OpenedImage, check_pixels, decode_image
from api.engine.images.recipe import EXACT_RESIZE_LIMIT, Recipe
from api.engine.memory import release_after_decode
from api.engine.model.served import Served
from api.errors import RequestError


@dataclass(frozen=True)
class BatchRun:
    """How one image was served: the size of its batch, that forward pass, its wait in the queue."""

    size: int
    forward_s: float
    queued_s: float


@dataclass
class Ticket:
    """Room reserved for admitted images; `queued` of them have reached the queue."""

    queued: int = 0


@dataclass(frozen=True)
class ImageDescription:
    width: int
    height: int
    format: str


@dataclass(frozen=True)
class Classified:
    """One image's answer: its labels (best first), its scores and how it was served."""

    labels: list[tuple[int, str, float]]
    scores: np.ndarray  # C float32
    spread: np.ndarray | None  # C float32: each score's standard deviation across folds (a fold ensemble)
    image: ImageDescription
    run: BatchRun


@dataclass(frozen=True)
class Explanation:
    """A Grad-CAM heatmap of one label: the model's input size, and where that input lies in the image."""

    heatmap: np.ndarray  # H x W uint8, 255 = speaks most for the label
    box: tuple[float, float, float, float]  # the crop (left, top, right, bottom) in the image's pixels
    layer: str
    seconds: float  # the explanation's own compute time
    memory_mb: float  # the explaining process's resident memory


Outcome = Classified | RequestError

# What a request hands the pipeline per image: an encoded image file, or 8-bit RGB pixels (H, W, 3)
# that the client decoded itself; both are resized, cropped and normalized by the model's recipe.
Upload = bytes | np.ndarray


@dataclass(frozen=True)
class Classification:
    """The outcomes in upload order, when decoding ended, the batches and the model that served them."""

    outcomes: list[Outcome]
    prepared_at: float  # time.perf_counter() once every upload was decoded
    served: Served  # the model that answered (read once per request: a swap never splits one)

    @property
    def runs(self) -> list[BatchRun]:
        return [o.run for o in self.outcomes if isinstance(o, Classified)]


class StageObserver(Protocol):
    def on_stage(self, stage: str, seconds: float) -> None: ...


def outcomes_in_order(
    prepared: Sequence[ImageDescription | RequestError],
    answers: Sequence[tuple[np.ndarray, BatchRun]],  # the engine's rows: Served.width floats each
    served: Served,
    observer: StageObserver,
    top_k: int,
) -> list[Outcome]:
    """Each upload's outcome, in upload order: its decode error, or its labels from the next answer
    (`answers` holds one per image that decoded, in order). Observes each image's queue and forward."""
    answered = iter(answers)
    outcomes: list[Outcome] = []
    for item in prepared:
        if isinstance(item, RequestError):
            outcomes.append(item)
            continue
        row, run = next(answered)
        observer.on_stage("queue", run.queued_s)
        observer.on_stage("forward", run.forward_s)
        scores, spread = served.split(row)
        outcomes.append(Classified(served.rank(scores, top_k), scores, spread, item, run))
    return outcomes


class Pipeline(Protocol):
    """Admit, classify, explain, describe, close: what the HTTP side and the CLI call."""

    @property
    def served(self) -> Served: ...

    def admit(self, images: int) -> AbstractContextManager[Ticket]: ...

    async def classify(
        self, ticket: Ticket, uploads: Sequence[Upload], *, top_k: int, deadline: float | None = None
    ) -> Classification: ...

    async def explain(self, upload: Upload, label: int, *, deadline: float) -> Explanation: ...

    def describe(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


def decode_budget(options: BatchingSettings) -> DecodeBudget:
    """What one upload may cost to decode (API_DECODE_BUDGET_MP)."""
    return _budget(options.decode_budget_mp)


_budget = lru_cache(maxsize=4)(DecodeBudget)


def prepare_upload(
    data: Upload | OpenedImage,
    recipe: Recipe,
    options: BatchingSettings,
    *,
    reduce_to: int | None,
    ship_decoded_bytes: int = 0,
) -> tuple[ImageDescription, np.ndarray, bool]:
    """Decode + the per-image half of preprocessing (in a decode pool, here or in a front-end).

    Answers the image's description, its pixels and whether they still need the resize + crop: with
    `ship_decoded_bytes` (the engine resizes on its GPU) a decoded image that fits is sent as is.
    Only the pixels leave: a queued request holds its model input, never its canvas."""
    if isinstance(data, np.ndarray):
        return _prepare_pixels(data, recipe, options, ship_decoded_bytes)
    if isinstance(data, OpenedImage):  # opened and priced already (a front-end's event loop did it)
        decoded = data.decode()
    else:
        decoded = decode_image(
            data, max_pixels=options.max_image_pixels, reduce_to=reduce_to, budget=decode_budget(options)
        )
    info = ImageDescription(decoded.width, decoded.height, decoded.format)
    if _ships(*decoded.size, recipe, ship_decoded_bytes):
        pixels, needs_resize = decoded.pixels, True
    else:
        pixels, needs_resize = fast_resize.pixels(decoded.image, recipe, options.resize), False
    priced = decoded.cost.memory
    del decoded
    release_after_decode(priced)
    return info, pixels, needs_resize


def _prepare_pixels(
    pixels: np.ndarray, recipe: Recipe, options: BatchingSettings, ship_decoded_bytes: int
) -> tuple[ImageDescription, np.ndarray, bool]:
    """A client's decoded pixels (H, W, 3): checked as an upload's canvas is, then shipped as they are
    (no copy here) or resized and cropped."""
    check_pixels(pixels, max_pixels=options.max_image_pixels, budget=decode_budget(options))
    height, width = pixels.shape[:2]
    info = ImageDescription(width, height, PIXELS_FORMAT)
    if _ships(width, height, recipe, ship_decoded_bytes):
        return info, pixels, True
    return info, fast_resize.pixels(Image.fromarray(pixels), recipe, options.resize), False


def _ships(width: int, height: int, recipe: Recipe, ship_decoded_bytes: int) -> bool:
    """Whether a decoded image goes to the engine as it is (the engine resizes on its GPU): it fits
    the slot and its resized size stays bounded."""
    resized_w, resized_h = recipe.resized_size(width, height)
    bounded = resized_w * resized_h <= EXACT_RESIZE_LIMIT * recipe.crop[0] * recipe.crop[1]
    # an image of the crop's size would pass for a model input (the engine tells the two by size)
    crop_sized = (height, width) == recipe.crop
    return width * height * 3 <= ship_decoded_bytes and bounded and max(width, height) < 65536 and not crop_sized
