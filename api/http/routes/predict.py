"""Prediction routes: one image, or several in one request. They parse the request and shape the
answer; the engine (api/engine/serving/service.py) does the rest."""

from __future__ import annotations

import base64
import io
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from PIL import Image

from api.engine.model.served import Served
from api.engine.serving.pipeline import Classification, Classified, Explanation
from api.errors import RequestError
from api.http.deps import HttpDep, MetricsDep, StateDep, require_api_key
from api.http.metrics import Metrics
from api.http.schemas import (
    Base64Image,
    BatchItem,
    BatchResponse,
    ErrorBody,
    ErrorResponse,
    ExplanationBody,
    ImageInfo,
    Label,
    ModelIdentity,
    Prediction,
    PredictResponse,
    Timing,
)
from api.http.uploads import UploadedFile, read_uploads

router = APIRouter(prefix="/api/v1", tags=["predict"], dependencies=[Depends(require_api_key)])

TopK = Annotated[
    int | None, Query(ge=1, le=1000, description="Labels to return (default API_TOP_K; ignored for multi-label).")
]

MinConfidence = Annotated[
    float | None,
    Query(
        ge=0.0,
        le=1.0,
        description="Mark the answer uncertain when its top (calibrated) score is below this "
        "(default API_MIN_CONFIDENCE).",
    ),
]

Explain = Annotated[
    bool,
    Query(
        description="Also answer a Grad-CAM heatmap of the top label (PNG, base64) and its crop box in the image. "
        "Costs far more than the prediction; at most API_MAX_EXPLANATIONS at once, beyond 503 explain_busy."
    ),
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
    503: {
        "model": ErrorResponse,
        "description": "Over capacity (API_MAX_QUEUE, or API_MAX_EXPLANATIONS for explain=true) or model not ready; "
        "see Retry-After.",
    },
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


def _identity(served: Served) -> ModelIdentity:
    return ModelIdentity(
        version=served.version,
        architecture=served.architecture,
        num_classes=served.num_classes,
        checkpoint_sha256=served.checkpoint_sha256,
        multi_label=served.multi_label,
        folds=served.folds,
    )


def _prediction(result: Classified, min_confidence: float) -> Prediction:
    spread = result.spread
    return Prediction(
        predictions=[
            Label(index=i, label=name, score=score, spread=None if spread is None else float(spread[i]))
            for i, name, score in result.labels
        ],
        uncertain=bool(result.scores.size) and float(result.scores.max()) < min_confidence,
        image=ImageInfo(width=result.image.width, height=result.image.height, format=result.image.format),
    )


async def _read(request: Request, metrics: Metrics, *, max_bytes: int, max_files: int) -> list[UploadedFile]:
    started = time.perf_counter()
    uploads = await read_uploads(request, max_bytes=max_bytes, max_files=max_files)
    metrics.on_stage("read", time.perf_counter() - started)
    return uploads


def _timing(started: float, classification: Classification, request: Request) -> Timing:
    runs = classification.runs
    request.state.batch_size = max((run.size for run in runs), default=0)  # for the access log line
    return Timing(
        decode_ms=round((classification.prepared_at - started) * 1000, 3),
        inference_ms=round(max((run.forward_s for run in runs), default=0.0) * 1000, 3),
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
    request: Request,
    state: StateDep,
    settings: HttpDep,
    metrics: MetricsDep,
    top_k: TopK = None,
    min_confidence: MinConfidence = None,
    explain: Explain = False,
) -> PredictResponse:
    """Classify one image sent as multipart field `file` (`curl -F file=@cat.jpg`), as a raw image
    body, or as JSON `{"image": "<base64>"}`. Answers the top-k labels (every label above the
    threshold for multi-label models), the model identity and timing."""
    started = time.perf_counter()
    deadline = time.monotonic() + settings.request_timeout_s  # counted from arrival, queueing included
    engine = state.require_ready()
    try:
        # Admission first: over capacity is answered (503) before the body is even read.
        with engine.admit(1) as ticket:
            uploads = await _read(request, metrics, max_bytes=settings.max_upload_bytes, max_files=1)
            classification = await engine.classify(
                ticket, [uploads[0].data], top_k=top_k or settings.top_k, deadline=deadline
            )
        (outcome,) = classification.outcomes
        if isinstance(outcome, RequestError):
            raise outcome
    except RequestError as error:
        metrics.on_images(error.code)
        raise
    metrics.on_images("ok")
    explanation = None
    if explain:
        label = int(outcome.scores.argmax())  # the top label (for multi-label too, above the threshold or not)
        explained = await engine.explain(uploads[0].data, label, deadline=deadline)
        explanation = _explanation(explained, label, classification.served)
    result = _prediction(outcome, settings.min_confidence if min_confidence is None else min_confidence)
    return PredictResponse(
        predictions=result.predictions,
        uncertain=result.uncertain,
        image=result.image,
        model=_identity(classification.served),
        timing=_timing(started, classification, request),
        explanation=explanation,
    )


def _explanation(explained: Explanation, label: int, served: Served) -> ExplanationBody:
    png = io.BytesIO()
    Image.fromarray(explained.heatmap, mode="L").save(png, format="PNG")
    height, width = explained.heatmap.shape
    return ExplanationBody(
        index=label,
        label=served.class_names[label],
        heatmap_png=base64.b64encode(png.getvalue()).decode(),
        width=width,
        height=height,
        box=list(explained.box),
        layer=explained.layer,
        explain_ms=round(explained.seconds * 1000, 1),
        memory_mb=explained.memory_mb,
    )


@router.post(
    "/predict/batch",
    response_model=BatchResponse,
    responses=_ERRORS,
    openapi_extra=_body_doc(multiple=True),
    summary="Classify several images",
)
async def predict_batch(
    request: Request,
    state: StateDep,
    settings: HttpDep,
    metrics: MetricsDep,
    top_k: TopK = None,
    min_confidence: MinConfidence = None,
) -> BatchResponse:
    """Classify up to API_MAX_BATCH_FILES images sent as repeated multipart `file` fields, in one
    forward pass. Each file gets its own result or error; one bad file does not fail the others."""
    started = time.perf_counter()
    deadline = time.monotonic() + settings.request_timeout_s  # counted from arrival, queueing included
    engine = state.require_ready()
    uploads = await _read(request, metrics, max_bytes=settings.max_upload_bytes, max_files=settings.max_batch_files)
    try:
        with engine.admit(len(uploads)) as ticket:
            classification = await engine.classify(
                ticket, [u.data for u in uploads], top_k=top_k or settings.top_k, deadline=deadline
            )
    except RequestError as error:
        metrics.on_images(error.code, len(uploads))
        raise
    items = []
    for upload, outcome in zip(uploads, classification.outcomes, strict=True):
        if isinstance(outcome, RequestError):
            metrics.on_images(outcome.code)
            items.append(
                BatchItem(
                    filename=upload.filename, ok=False, error=ErrorBody(code=outcome.code, message=outcome.message)
                )
            )
        else:
            metrics.on_images("ok")
            threshold = settings.min_confidence if min_confidence is None else min_confidence
            items.append(BatchItem(filename=upload.filename, ok=True, result=_prediction(outcome, threshold)))
    return BatchResponse(
        results=items, model=_identity(classification.served), timing=_timing(started, classification, request)
    )
