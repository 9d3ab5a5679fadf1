"""Prediction routes: one image, or several in one request."""

from __future__ import annotations

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


def _count(metrics: Metrics, outcome: str, batch: int = 0, seconds: float = 0.0) -> None:
    metrics.images.labels(outcome).inc()
    if batch:
        metrics.batch_size.observe(batch)
        metrics.inference.observe(seconds)


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
        _count(metrics, error.code)
        raise
    prepared = time.perf_counter()
    scores, seconds = await engine.predict([tensor])
    _count(metrics, "ok", 1, seconds)
    result = _prediction(classifier, decoded, scores[0], top_k or settings.top_k)
    return PredictResponse(
        predictions=result.predictions,
        image=result.image,
        model=_identity(classifier),
        timing=Timing(
            decode_ms=round((prepared - started) * 1000, 3),
            inference_ms=round(seconds * 1000, 3),
            total_ms=round((time.perf_counter() - started) * 1000, 3),
        ),
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
    items: list[BatchItem] = [BatchItem(filename=u.filename, ok=False) for u in uploads]
    ready: list[tuple[int, DecodedImage, torch.Tensor]] = []
    for position, upload in enumerate(uploads):
        try:
            decoded, tensor = await run_in_threadpool(_prepare, upload, classifier, settings.max_image_pixels)
        except RequestError as error:
            _count(metrics, error.code)
            items[position].error = ErrorBody(code=error.code, message=error.message)
            continue
        ready.append((position, decoded, tensor))
    prepared = time.perf_counter()
    seconds = 0.0
    if ready:
        scores, seconds = await engine.predict([tensor for _, _, tensor in ready])
        for row, (position, decoded, _) in enumerate(ready):
            _count(metrics, "ok")
            items[position].ok = True
            items[position].result = _prediction(classifier, decoded, scores[row], top_k or settings.top_k)
        metrics.batch_size.observe(len(ready))
        metrics.inference.observe(seconds)
    return BatchResponse(
        results=items,
        model=_identity(classifier),
        timing=Timing(
            decode_ms=round((prepared - started) * 1000, 3),
            inference_ms=round(seconds * 1000, 3),
            total_ms=round((time.perf_counter() - started) * 1000, 3),
        ),
    )
