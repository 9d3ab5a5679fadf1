"""The Open Inference Protocol (KServe v2, as Triton speaks it): health, metadata, infer, and
Triton's model repository extension for swapping the model.

The same engine path as /api/v1: admission, decode limits, batching, the API key, metrics and logs.
One model under two names, its version the checkpoint's short sha256:
    API_SERVED_MODEL_NAME           input image   BYTES [N] or [N, 1]: one encoded image file per element
    API_SERVED_MODEL_NAME-pixels    input pixels  UINT8 [N, H, W, 3]: 8-bit RGB the client decoded itself
    both: output probabilities  FP32 [N, C] in label order; with "classification": k, BYTES [N, min(k, C)]
Pixels are resized, cropped and normalized by the model's own recipe, as a decoded file is.
Errors are {"error": "<message>"} (api/http/app.py shapes every error under /v2 that way).
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from api import __version__
from api.config import HttpSettings
from api.engine.model.served import Served
from api.engine.serving.pipeline import Classified, Pipeline
from api.errors import InvalidRequest, NotFound, NotImplementedHere, RequestError
from api.http.deps import HttpDep, MetricsDep, StateDep, require_admin_key, require_api_key
from api.http.readiness import ServiceState
from api.http.schemas import (
    InferResponse,
    ModelLoaded,
    ModelMetadata,
    ModelReady,
    RepositoryEntry,
    ServerMetadata,
    V2Error,
    V2NotReady,
)
from api.http.tensors import (
    HEADER_LENGTH,
    IMAGE,
    OUTPUT,
    PIXELS,
    InputSpec,
    encode_infer,
    output_tensor,
    parse_infer,
)

if TYPE_CHECKING:
    from api.remote.frontend.link import EngineLink

PREFIX = "/v2"
PLATFORM = "pytorch_timm"
EXTENSIONS = ["binary_tensor_data", "classification", "model_configuration"]

router = APIRouter(prefix=PREFIX, tags=["open inference protocol (v2)"])
models = APIRouter(
    prefix=PREFIX + "/models", tags=["open inference protocol (v2)"], dependencies=[Depends(require_api_key)]
)
repository = APIRouter(
    prefix=PREFIX + "/repository", tags=["model repository (v2)"], dependencies=[Depends(require_admin_key)]
)


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    what = {
        400: "Malformed request, or an element that is not a decodable image.",
        401: "The key is missing or wrong (API_API_KEY; API_ADMIN_KEY for the repository routes).",
        404: "No such model or version.",
        409: "A model load is already running.",
        413: "Body over the limit, more images than API_MAX_BATCH_FILES, or an image over the pixel limits.",
        415: "An element is not a supported image.",
        501: "Not supported by this server.",
        503: "Model not ready, or over capacity (Retry-After).",
        504: "No answer within API_REQUEST_TIMEOUT_S.",
    }
    return {status: {"model": V2Error, "description": what[status]} for status in statuses}


KEYED = (401, 404, 503)


def _unavailable(reason: str | None) -> JSONResponse:
    return JSONResponse(
        {"ready": False, "error": f"not ready: {reason}"}, status_code=503, headers={"Retry-After": "5"}
    )


@router.get("", summary="Server metadata", response_model=ServerMetadata)
async def server_metadata(request: Request) -> dict[str, Any]:
    extensions = EXTENSIONS + (["model_repository"] if request.app.state.http.admin_key is not None else [])
    return {"name": "cat-breeds-api", "version": __version__, "extensions": extensions}


@router.get("/health/live", summary="Server live", response_model=dict[str, bool])
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get(
    "/health/ready",
    summary="Server ready",
    response_model=dict[str, bool],
    responses={503: {"model": V2NotReady, "description": "Loading, failed or draining."}},
)
async def ready(state: StateDep) -> dict[str, bool] | JSONResponse:
    """200 {"ready": true} once the model serves; 503 while loading, failed or draining (never during a swap)."""
    return {"ready": True} if state.ready else _unavailable(state.reason)


def model_names(http: HttpSettings) -> dict[str, InputSpec]:
    """The served model's names, each with its input: files, and pixels decoded by the client."""
    return {http.served_model_name: IMAGE, f"{http.served_model_name}-pixels": PIXELS}


def _input(name: str, http: HttpSettings) -> InputSpec:
    names = model_names(http)
    if name not in names:
        raise NotFound(f"unknown model {name!r}; this server serves {' and '.join(map(repr, names))}")
    return names[name]


def _served(
    name: str, version: str | None, state: ServiceState, http: HttpSettings
) -> tuple[Pipeline, Served, InputSpec]:
    """The engine serving `name` (and `version`, if given), and that name's input: 404 for another
    name or version, 503 when not ready."""
    spec = _input(name, http)
    engine = state.require_ready()
    served = engine.served
    if version is not None and version != served.version:
        raise NotFound(f"model {name!r} has no version {version!r}; it serves version {served.version!r}")
    return engine, served, spec


def _metadata(name: str, served: Served, spec: InputSpec) -> dict[str, Any]:
    return {
        "name": name,
        "versions": [served.version],
        "platform": PLATFORM,
        "inputs": [{"name": spec.name, "datatype": spec.datatype, "shape": spec.shape}],
        "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, served.num_classes]}],
    }


@models.get("/{name}", summary="Model metadata", response_model=ModelMetadata, responses=_errors(*KEYED))
@models.get(
    "/{name}/versions/{version}",
    summary="Model metadata (one version)",
    response_model=ModelMetadata,
    responses=_errors(*KEYED),
)
async def model_metadata(name: str, state: StateDep, http: HttpDep, version: str | None = None) -> dict[str, Any]:
    _, served, spec = _served(name, version, state, http)
    return _metadata(name, served, spec)


@models.get("/{name}/ready", summary="Model ready", response_model=ModelReady, responses=_errors(*KEYED))
@models.get(
    "/{name}/versions/{version}/ready",
    summary="Model ready (one version)",
    response_model=ModelReady,
    responses=_errors(*KEYED),
)
async def model_ready(name: str, state: StateDep, http: HttpDep, version: str | None = None) -> dict[str, Any]:
    _served(name, version, state, http)
    return {"name": name, "ready": True}


@models.get(
    "/{name}/config",
    summary="Model configuration (Triton's model_configuration extension)",
    responses=_errors(*KEYED),
)
@models.get("/{name}/versions/{version}/config", summary="Model configuration (one version)", responses=_errors(*KEYED))
async def model_config(name: str, state: StateDep, http: HttpDep, version: str | None = None) -> dict[str, Any]:
    """A minimal Triton ModelConfig: what tritonclient's tools and perf_analyzer read."""
    _, served, spec = _served(name, version, state, http)
    return {
        "name": name,
        "platform": PLATFORM,
        "backend": "cat-breeds-api",
        "max_batch_size": 0,  # the batch dimension is part of the shapes below
        "input": [{"name": spec.name, "data_type": spec.config_type, "dims": spec.shape}],
        "output": [{"name": OUTPUT, "data_type": "TYPE_FP32", "dims": [-1, served.num_classes]}],
        "version_policy": {"latest": {"num_versions": 1}},
        "dynamic_batching": {},  # requests from every client are batched together
        "parameters": {
            "architecture": {"string_value": served.architecture},
            "labels": {"string_value": json.dumps(list(served.class_names))},
            "folds": {"string_value": str(served.folds)},
        },
    }


_INFER_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"type": "object", "required": ["inputs"]}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
_INFER_ANSWERS: dict[int | str, dict[str, Any]] = {
    200: {
        "model": InferResponse,
        "description": "JSON outputs, or (binary outputs asked for) the JSON header then the tensors' bytes.",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    },
    **_errors(400, 401, 404, 413, 415, 503, 504),
}


@models.post(
    "/{name}/infer", summary="Infer", response_class=Response, responses=_INFER_ANSWERS, openapi_extra=_INFER_DOC
)
@models.post(
    "/{name}/versions/{version}/infer",
    summary="Infer (one version)",
    response_class=Response,
    responses=_INFER_ANSWERS,
    openapi_extra=_INFER_DOC,
)
async def infer(
    name: str, request: Request, state: StateDep, http: HttpDep, metrics: MetricsDep, version: str | None = None
) -> Response:
    """JSON or binary tensor data in (tritonclient's default: JSON header + length-prefixed BYTES, no
    Content-Type); JSON or binary outputs back, as the request asks."""
    deadline = time.monotonic() + http.request_timeout_s
    engine, _, spec = _served(name, version, state, http)
    started = time.perf_counter()
    body = await request.body()
    metrics.on_stage("read", time.perf_counter() - started)
    wanted = parse_infer(body, request.headers.get(HEADER_LENGTH), max_images=http.max_batch_files, spec=spec)
    images = len(wanted.images)
    try:
        with engine.admit(images) as ticket:
            classification = await engine.classify(ticket, wanted.images, top_k=1, deadline=deadline)
    except RequestError as error:
        metrics.on_images(error.code, images)
        raise
    for index, outcome in enumerate(classification.outcomes):
        if isinstance(outcome, RequestError):  # v2 answers a batch whole: the first bad element fails it
            metrics.on_images(outcome.code, images)
            outcome.message = f"input {spec.name!r} element {index}: {outcome.message}"
            raise outcome
    metrics.on_images("ok", images)
    answered = [outcome for outcome in classification.outcomes if isinstance(outcome, Classified)]
    request.state.batch_size = max(o.run.size for o in answered)  # for the access log line
    served = classification.served
    scores = np.stack([o.scores for o in answered])
    header: dict[str, Any] = {
        "model_name": name,
        "model_version": served.version,
        "parameters": {"folds": served.folds},  # how many folds answered as one model
    }
    if wanted.id is not None:
        header["id"] = wanted.id
    content, headers = encode_infer(header, [output_tensor(o, scores, served.class_names) for o in wanted.outputs])
    return Response(content, headers=headers)


@repository.post("/index", summary="Repository index", response_model=list[RepositoryEntry], responses=_errors(401))
async def repository_index(state: StateDep, http: HttpDep) -> list[dict[str, str]]:
    """Both names of the one model: they are loaded, swapped and ready together."""
    served = state.served
    version = served.version if served else ""
    if state.ready:
        status = {"state": "READY", "reason": ""}
    else:
        status = {"state": "UNAVAILABLE" if state.status == "failed" else "LOADING", "reason": state.reason or ""}
    return [{"name": name, "version": version, **status} for name in model_names(http)]


@repository.post(
    "/models/{name}/load",
    summary="Load (swap in) a checkpoint without downtime",
    response_model=ModelLoaded,
    responses=_errors(400, 401, 404, 409, 503),
)
async def load_model(name: str, request: Request, state: StateDep, http: HttpDep) -> dict[str, Any]:
    """Load `parameters.checkpoint` (else the configured checkpoint, read again) beside the served
    model, check its labels, warm it up, switch every front-end to it, and answer once switched.
    Either name swaps the one model both serve.
    400: it cannot serve (the old model keeps serving, the error says why); 409: a load is running."""
    _input(name, http)
    checkpoint = _checkpoint_parameter(await request.body())
    state.require_ready()
    link: EngineLink = request.app.state.owner.link  # the front-end's link to the engine process
    answer = await link.reload(checkpoint)  # ModelLoadRefused: 400 or 409, the old model serves
    return {"name": name, **{k: v for k, v in answer.items() if k not in ("token", "status")}}


@repository.post("/models/{name}/unload", summary="Unload (not supported)", responses=_errors(401, 501))
async def unload_model(name: str) -> None:
    raise NotImplementedHere(
        "unloading is not supported: this server always serves one model; load another checkpoint to replace it"
    )


def _checkpoint_parameter(body: bytes) -> str | None:
    if not body.strip():
        return None
    try:
        request = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InvalidRequest(f"the load request is not JSON: {error}") from None
    parameters = request.get("parameters") if isinstance(request, dict) else None
    checkpoint = (parameters or {}).get("checkpoint")
    if checkpoint is not None and (not isinstance(checkpoint, str) or not checkpoint.strip()):
        raise InvalidRequest("parameters.checkpoint must be a path to a checkpoint file or timm model folder")
    return checkpoint
