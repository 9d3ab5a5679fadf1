"""Prediction routes: one image, or several in one request."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import time
from typing import Annotated, Any

import torch
from fastapi import APIRouter, Depends, Query, Request

from api.batching import BatchRun, Prepared
from api.config import Settings
from api.deps import MetricsDep, SettingsDep, StateDep, require_api_key
from api.errors import RequestError
from api.memory import release_after_decode
from api.metrics import Metrics
from api.model import Classifier
from api.preprocess import decode_image
from api.schemas import (
    Base64Image,
    BatchItem,
    BatchResponse,
    ErrorBody,
    ErrorResponse,
    ImageInfo,
    Label,
    ModelIdentity,
    Prediction,
    PredictResponse,
    Timing,
)
from api.state import Serving
from api.uploads import Upload, read_uploads

router = APIRouter(prefix="/api/v1", tags=["predict"], dependencies=[Depends(require_api_key)])

TopK = Annotated[
    int | None, Query(ge=1, le=1000, description="Labels to return (default API_TOP_K; ignored for multi-label).")
]

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Corrupt or undecodable image, bad base64/JSON."},
    401: {"model": ErrorResponse, "description": "API_API_KEY is set and the request lacks it."},
    413: {
        "model": ErrorResponse,
        "description": "Upload over API_MAX_UPLOAD_MB, canvas over API_MAX_IMAGE_PIXELS, or costlier to decode "
        "than API_DECODE_BUDGET_MP.",
    },
    415: {"model": ErrorResponse, "description": "Not a supported image (decided from the bytes)."},
    422: {"model": ErrorResponse, "description": "No file in the request, or a bad query parameter."},
    503: {"model": ErrorResponse, "description": "Over capacity (API_MAX_QUEUE) or model not ready; see Retry-After."},
    504: {"model": ErrorResponse, "description": "No answer within API_REQUEST_TIMEOUT_S (queueing included)."},
}


def _body_doc(multiple: bool) -> dict[str, Any]:
    file_schema: dict[str, Any] = {"type": "string", "format": "binary"}
    if multiple:
        file_schema = {"type": "array", "items": file_schema}
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {"type": "object", "required": ["file"], "properties": {"file": file_schema}}
                },
                "image/*": {"schema": {"type": "string", "format": "binary"}},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                "application/json": {"schema": Base64Image.model_json_schema()},
            },
        }
    }


def _identity(classifier: Classifier) -> ModelIdentity:
    return ModelIdentity(
        architecture=classifier.architecture,
        num_classes=classifier.num_classes,
        checkpoint_sha256=classifier.checkpoint.sha256,
        multi_label=classifier.multi_label,
    )


def _prepare(upload: Upload, classifier: Classifier, settings: Settings) -> tuple[ImageInfo, Prepared]:
    """Decode + per-image preprocessing. Only the model's input and the image's description leave
    the pool: a queued request holds its 224x224 pixels, never its decoded canvas."""
    reduce_to = classifier.resize_short_side if settings.reduced_decode else None
    decoded = decode_image(
        upload.data, max_pixels=settings.max_image_pixels, reduce_to=reduce_to, budget=settings.decode_budget
    )
    info = ImageInfo(width=decoded.width, height=decoded.height, format=decoded.format)
    prepared = classifier.prepare(decoded.image)
    priced = decoded.cost.memory
    del decoded
    release_after_decode(priced)
    return info, prepared


async def _decode(serving: Serving, upload: Upload, settings: Settings) -> tuple[ImageInfo, Prepared]:
    """Decode + preprocess in the decode pool (sized from the CPU quota), never on the event loop."""
    loop = asyncio.get_running_loop()
    job = functools.partial(contextvars.copy_context().run, _prepare, upload, serving.classifier, settings)
    return await loop.run_in_executor(serving.decoder, job)  # in the request's context: its id on any record


def _prediction(classifier: Classifier, info: ImageInfo, scores: torch.Tensor, top_k: int) -> Prediction:
    return Prediction(
        predictions=[Label(index=i, label=name, score=score) for i, name, score in classifier.rank(scores, top_k)],
        image=info,
    )


def _record(metrics: Metrics, outcome: str, count: int = 1) -> None:
    metrics.images.labels(outcome).inc(count)
    if outcome in ("overloaded", "timeout"):
        metrics.rejected.labels(outcome).inc(count)


def _observe(request: Request, metrics: Metrics, runs: list[BatchRun]) -> float:
    """Queue and forward stages per image; the batch size for the access log. Returns the forward seconds."""
    for run in runs:
        metrics.stage.labels("queue").observe(run.queued_s)
        metrics.stage.labels("forward").observe(run.forward_s)
    request.state.batch_size = max((run.size for run in runs), default=0)
    return max((run.forward_s for run in runs), default=0.0)


async def _read(request: Request, metrics: Metrics, *, max_bytes: int, max_files: int) -> list[Upload]:
    started = time.perf_counter()
    uploads = await read_uploads(request, max_bytes=max_bytes, max_files=max_files)
    metrics.stage.labels("read").observe(time.perf_counter() - started)
    return uploads


async def _decode_timed(
    serving: Serving, upload: Upload, settings: Settings, metrics: Metrics
) -> tuple[ImageInfo, Prepared]:
    started = time.perf_counter()
    result = await _decode(serving, upload, settings)
    metrics.stage.labels("decode").observe(time.perf_counter() - started)
    return result


def _timing(started: float, prepared: float, inference_s: float) -> Timing:
    return Timing(
        decode_ms=round((prepared - started) * 1000, 3),
        inference_ms=round(inference_s * 1000, 3),
        total_ms=round((time.perf_counter() - started) * 1000, 3),
    )


@router.post(
    "/predict",
    response_model=PredictResponse,
    responses=_ERRORS,
    openapi_extra=_body_doc(multiple=False),
    summary="Classify one image",
)
async def predict(
    request: Request, state: StateDep, settings: SettingsDep, metrics: MetricsDep, top_k: TopK = None
) -> PredictResponse:
    """Classify one image sent as multipart field `file` (`curl -F file=@cat.jpg`), as a raw image
    body, or as JSON `{"image": "<base64>"}`. Answers the top-k labels (every label above the
    threshold for multi-label models), the model identity and timing."""
    started = time.perf_counter()
    deadline = time.monotonic() + settings.request_timeout_s  # counted from arrival, queueing included
    serving = state.require_ready()
    classifier = serving.classifier
    try:
        # Admission first: over capacity is answered (503) before the body is even read.
        with serving.batcher.admit(1) as ticket:
            uploads = await _read(request, metrics, max_bytes=settings.max_upload_bytes, max_files=1)
            info, tensor = await _decode_timed(serving, uploads[0], settings, metrics)
            prepared = time.perf_counter()
            scores, runs = await serving.batcher.predict(ticket, [tensor], deadline=deadline)
    except RequestError as error:
        _record(metrics, error.code)
        raise
    _record(metrics, "ok")
    seconds = _observe(request, metrics, runs)
    result = _prediction(classifier, info, scores[0], top_k or settings.top_k)
    return PredictResponse(
        predictions=result.predictions,
        image=result.image,
        model=_identity(classifier),
        timing=_timing(started, prepared, seconds),
    )


@router.post(
    "/predict/batch",
    response_model=BatchResponse,
    responses=_ERRORS,
    openapi_extra=_body_doc(multiple=True),
    summary="Classify several images",
)
async def predict_batch(
    request: Request, state: StateDep, settings: SettingsDep, metrics: MetricsDep, top_k: TopK = None
) -> BatchResponse:
    """Classify up to API_MAX_BATCH_FILES images sent as repeated multipart `file` fields, in one
    forward pass. Each file gets its own result or error; one bad file does not fail the others."""
    started = time.perf_counter()
    deadline = time.monotonic() + settings.request_timeout_s  # counted from arrival, queueing included
    serving = state.require_ready()
    classifier = serving.classifier
    uploads = await _read(request, metrics, max_bytes=settings.max_upload_bytes, max_files=settings.max_batch_files)
    items = [BatchItem(filename=u.filename, ok=False) for u in uploads]

    async def prepare(upload: Upload) -> tuple[ImageInfo, Prepared] | RequestError:
        try:
            return await _decode_timed(serving, upload, settings, metrics)
        except RequestError as error:
            return error

    try:
        with serving.batcher.admit(len(uploads)) as ticket:
            # Decode the files concurrently, then classify the good ones together.
            outcomes = await asyncio.gather(*(prepare(upload) for upload in uploads))
            ready = []
            for item, outcome in zip(items, outcomes, strict=True):
                if isinstance(outcome, RequestError):
                    _record(metrics, outcome.code)
                    item.error = ErrorBody(code=outcome.code, message=outcome.message)
                else:
                    ready.append((item, *outcome))
            prepared = time.perf_counter()
            seconds = 0.0
            if ready:
                scores, runs = await serving.batcher.predict(
                    ticket, [tensor for _, _, tensor in ready], deadline=deadline
                )
                seconds = _observe(request, metrics, runs)
    except RequestError as error:
        _record(metrics, error.code, len(uploads))
        raise
    _record(metrics, "ok", len(ready))
    for row, (item, info, _) in enumerate(ready):
        item.ok = True
        item.result = _prediction(classifier, info, scores[row], top_k or settings.top_k)
    return BatchResponse(results=items, model=_identity(classifier), timing=_timing(started, prepared, seconds))
