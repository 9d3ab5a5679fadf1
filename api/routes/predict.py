"""Prediction routes: one image, or several in one request."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any

import torch
from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool

from api.deps import MetricsDep, SettingsDep, StateDep
from api.errors import RequestError
from api.metrics import Metrics
from api.model import Classifier
from api.preprocess import DecodedImage, decode_image
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
from api.uploads import Upload, read_uploads

router = APIRouter(prefix="/api/v1", tags=["predict"])

TopK = Annotated[
    int | None, Query(ge=1, le=1000, description="Labels to return (default API_TOP_K; ignored for multi-label).")
]

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Corrupt or undecodable image, bad base64/JSON."},
    413: {"model": ErrorResponse, "description": "Upload over API_MAX_UPLOAD_MB or canvas over API_MAX_IMAGE_PIXELS."},
    415: {"model": ErrorResponse, "description": "Not a supported image (decided from the bytes)."},
    422: {"model": ErrorResponse, "description": "No file in the request, or a bad query parameter."},
    503: {"model": ErrorResponse, "description": "Model not ready (loading, failed, stopping); see Retry-After."},
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


def _prepare(upload: Upload, classifier: Classifier, max_pixels: int) -> tuple[DecodedImage, torch.Tensor]:
    decoded = decode_image(upload.data, max_pixels=max_pixels)
    return decoded, classifier.preprocess(decoded.image)


def _prediction(classifier: Classifier, decoded: DecodedImage, scores: torch.Tensor, top_k: int) -> Prediction:
    return Prediction(
        predictions=[Label(index=i, label=name, score=score) for i, name, score in classifier.rank(scores, top_k)],
        image=ImageInfo(width=decoded.width, height=decoded.height, format=decoded.format),
    )


def _record(metrics: Metrics, outcome: str, count: int = 1) -> None:
    metrics.images.labels(outcome).inc(count)


def _record_batch(metrics: Metrics, size: int, seconds: float) -> None:
    _record(metrics, "ok", size)
    metrics.batch_size.observe(size)
    metrics.inference.observe(seconds)


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
    classifier, engine = state.require_ready()
    uploads = await read_uploads(request, max_bytes=settings.max_upload_bytes, max_files=1)
    try:
        decoded, tensor = await run_in_threadpool(_prepare, uploads[0], classifier, settings.max_image_pixels)
    except RequestError as error:
        _record(metrics, error.code)
        raise
    prepared = time.perf_counter()
    scores, seconds = await engine.predict([tensor])
    _record_batch(metrics, 1, seconds)
    result = _prediction(classifier, decoded, scores[0], top_k or settings.top_k)
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
    classifier, engine = state.require_ready()
    uploads = await read_uploads(request, max_bytes=settings.max_upload_bytes, max_files=settings.max_batch_files)
    items = [BatchItem(filename=u.filename, ok=False) for u in uploads]

    async def prepare(upload: Upload) -> tuple[DecodedImage, torch.Tensor] | RequestError:
        try:
            return await run_in_threadpool(_prepare, upload, classifier, settings.max_image_pixels)
        except RequestError as error:
            return error

    # Decode the files concurrently (thread pool), then classify the good ones in one forward pass.
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
        scores, seconds = await engine.predict([tensor for _, _, tensor in ready])
        _record_batch(metrics, len(ready), seconds)
        for row, (item, decoded, _) in enumerate(ready):
            item.ok = True
            item.result = _prediction(classifier, decoded, scores[row], top_k or settings.top_k)
    return BatchResponse(results=items, model=_identity(classifier), timing=_timing(started, prepared, seconds))
