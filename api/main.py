"""Assemble the app: settings -> middleware, routes, error mapping and the model-loading lifespan.

`api.main:app` is what uvicorn and gunicorn import; it is built on first access from the
environment. Tests and the CLI call `create_app(settings)` with settings of their own.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from api import __version__
from api.batching import Batcher
from api.config import ConfigError, Settings, get_settings
from api.errors import RequestError, StartupError
from api.limits import BodyLimitMiddleware
from api.logs import configure_logging
from api.memory import keep_freed_memory
from api.metrics import Metrics, MetricsMiddleware
from api.model import Classifier, load_classifier
from api.requestlog import RequestLogMiddleware
from api.resources import cpu_budget
from api.routes import health, model, predict
from api.routes.web import add_web_ui
from api.state import ServiceState, Serving

logger = logging.getLogger(__name__)

# Exit status after a failed model load: gunicorn reads 3 as "worker failed to boot" and stops
# instead of restarting workers that would fail the same way.
EXIT_LOAD_FAILED = 3
EXIT_BAD_CONFIG = 2

_NO_CHECKPOINT = (
    "API_CHECKPOINT_PATH is not set; point it at your checkpoint file or timm model folder "
    "(e.g. outputs/checkpoints/fold_0/best_model.pt), or run `make run` to serve the demo model"
)


def load_configured_classifier(settings: Settings) -> Classifier:
    if settings.checkpoint_path is None:
        raise ConfigError(_NO_CHECKPOINT)
    return load_classifier(
        settings.checkpoint_path,
        model_name=settings.model_name,
        num_classes=settings.num_classes,
        image_size=settings.image_size,
        class_names_path=settings.class_names_path,
        use_ema=settings.use_ema,
        multi_label=settings.multi_label,
        threshold=settings.threshold,
        device=settings.device,
        precision=settings.precision,
        compile_model=settings.compile,
        cuda_graphs=settings.cuda_graphs,
        max_batch_size=settings.max_batch_size,
    )


def start_serving(settings: Settings, metrics: Metrics) -> Serving:
    """Load the classifier on the inference thread (threads sized from the CPU quota), start its
    batcher and the decode pool."""
    budget = cpu_budget(settings.num_threads, workers=settings.workers)
    logger.info("cpu: %s; torch intra-op threads %d, decode pool %d", budget.describe(), budget.threads, budget.threads)

    def observe(size: int, seconds: float) -> None:
        metrics.batch_size.observe(size)
        metrics.inference.observe(seconds)
        device = batcher.classifier.device if batcher.classifier is not None else None
        if device is not None and device.type == "cuda":
            metrics.gpu_memory.set(torch.cuda.memory_allocated(device))

    logger.info(keep_freed_memory(settings.heap_keep_mb))

    def load() -> Classifier:
        torch.set_num_threads(budget.threads)
        return load_configured_classifier(settings)

    batcher = Batcher(
        max_batch_size=settings.max_batch_size,
        max_wait_s=settings.max_batch_wait_ms / 1000,
        max_queue=settings.max_queue,
        timeout_s=settings.request_timeout_s,
        on_batch=observe,
        on_depth=metrics.queue_depth.set,
    )
    classifier = batcher.start(load)
    decoder = ThreadPoolExecutor(max_workers=budget.threads, thread_name_prefix="decode")
    return Serving(classifier, batcher, decoder)


async def _load_in_background(app: FastAPI, settings: Settings, *, exit_on_failure: bool) -> None:
    state: ServiceState = app.state.service
    metrics: Metrics = app.state.metrics
    try:
        serving = await asyncio.to_thread(start_serving, settings, metrics)
    except StartupError as error:
        state.set_failed(str(error))
        logger.error("model load failed: %s", error)
    except Exception as error:  # an unforeseen failure must still end "loading", with its traceback logged
        state.set_failed(f"unexpected {type(error).__name__} while loading the model: {error}")
        logger.exception("model load failed unexpectedly")
    else:
        state.set_ready(serving)
        metrics.ready.set(1)
        metrics.load_seconds.set(serving.classifier.load_seconds)
        _log_ready(serving.classifier, settings)
        return
    if exit_on_failure:
        # Fail fast: never linger half-started. Nothing was accepted (predict answered 503).
        logging.shutdown()
        os._exit(EXIT_LOAD_FAILED)


def _log_ready(classifier: Classifier, settings: Settings) -> None:
    """One line that says what is being served and under which limits (never the API key itself)."""
    ckpt = classifier.checkpoint
    summary = {
        "event": "ready",
        "model": classifier.architecture,
        "classes": classifier.num_classes,
        "labels": classifier.labels_source,
        "checkpoint": str(ckpt.path),
        "checkpoint_format": ckpt.format + (f":{ckpt.weights_key}" if ckpt.weights_key else ""),
        "checkpoint_sha256": ckpt.sha256[:12],
        "device": str(classifier.device),
        "device_reason": classifier.device_reason,
        "dtype": settings.precision,
        "compiled": settings.compile,
        "input_size": list(classifier.data_config.get("input_size", ())),
        "load_s": round(classifier.load_seconds, 2),
        "max_batch_size": settings.max_batch_size,
        "max_batch_wait_ms": settings.max_batch_wait_ms,
        "max_queue": settings.max_queue,
        "request_timeout_s": settings.request_timeout_s,
        "max_upload_mb": settings.max_upload_mb,
        "max_image_pixels": settings.max_image_pixels,
        "decode_budget_mb": round(settings.decode_budget.allowance.memory_mb),
        "api_key": "set" if settings.api_key is not None else "not set",
    }
    logger.info(
        "model ready: %s, %d classes (labels: %s), %s %s on %s, loaded and warmed up in %.2fs; "
        "batches <= %d, queue <= %d, deadline %gs, uploads <= %g MiB (decode <= %d MB), API key %s",
        summary["model"],
        summary["classes"],
        summary["labels"],
        summary["checkpoint"],
        summary["checkpoint_format"],
        summary["device"],
        classifier.load_seconds,
        settings.max_batch_size,
        settings.max_queue,
        settings.request_timeout_s,
        settings.max_upload_mb,
        summary["decode_budget_mb"],
        summary["api_key"],
        extra=summary,
    )
    logger.debug("preprocessing: %s", classifier.data_config)


def create_app(settings: Settings, *, exit_on_load_failure: bool = True) -> FastAPI:
    """Build the app. Nothing heavy happens here: the model loads in the lifespan, off the loop."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.service = ServiceState()
        loader = asyncio.create_task(_load_in_background(app, settings, exit_on_failure=exit_on_load_failure))
        if getattr(app.state, "accept_after_load", False):
            # Gunicorn worker: the server starts accepting when the lifespan has started, so other,
            # ready workers take every connection until this one's model is loaded (none meets a 503)
            await loader
        try:
            yield
        finally:
            app.state.service.set_stopping()
            app.state.metrics.ready.set(0)
            loader.cancel()
            serving = app.state.service.serving
            if serving is not None:
                await asyncio.to_thread(serving.close)

    app = FastAPI(
        title="cat-breeds-api",
        version=__version__,
        summary="Image classification with a fine-tuned timm model.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics = Metrics()
    app.state.service = ServiceState()

    # Bodies are refused while being read once past these limits (413), never buffered whole.
    single = settings.max_upload_bytes * 4 // 3 + 64 * 1024  # room for base64 and multipart framing
    limits = {"/api/v1/predict": single, "/api/v1/predict/batch": single * settings.max_batch_files}
    app.add_middleware(BodyLimitMiddleware, limit_for_path=limits.get)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-API-Key"],
        )
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(RequestLogMiddleware)  # outermost: every answer, refusals included, gets an id
    _add_error_handlers(app)
    app.include_router(health.router)
    app.include_router(predict.router)
    app.include_router(model.router)
    if settings.web_ui:
        add_web_ui(app)
    return app


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def request_error(_: Request, error: RequestError) -> JSONResponse:
        return _error(error.status, error.code, error.message, error.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in item['loc'])}: {item['msg']}" for item in error.errors())
        return _error(422, "validation_error", problems or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
        return _error(
            error.status_code,
            codes.get(error.status_code, f"http_{error.status_code}"),
            str(error.detail),
            getattr(error, "headers", None),
        )


def app_from_environment() -> FastAPI:
    """The app for `uvicorn api.main:app`: settings from the environment, one line and exit if invalid."""
    try:
        settings = get_settings()
    except ConfigError as error:
        sys.stderr.write(f"configuration error: {error}\n")
        raise SystemExit(EXIT_BAD_CONFIG) from None
    configure_logging(settings.log_level, settings.log_dir, settings.log_format)
    return create_app(settings)


_app: FastAPI | None = None


def __getattr__(name: str) -> Any:
    # `api.main:app` is built on first access, so importing this module (tests, the CLI, tools)
    # neither reads the environment nor fails on settings meant for another process.
    global _app
    if name == "app":
        if _app is None:
            _app = app_from_environment()
        return _app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
