"""The app factory: settings -> middleware, routes, error mapping and the engine-starting lifespan.

Nothing heavy happens in `create_app`: the engine starts in the lifespan, off the event loop.
Runners say what they need explicitly (`LoadPolicy`), and hand in the `ServiceState` they drain.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from api import __version__
from api.config import HttpSettings, Settings
from api.engine.model.measure.evaluation import Evaluation
from api.engine.serving.pipeline import Pipeline
from api.errors import (
    EXIT_LOAD_FAILED,
    HttpError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    RequestError,
    ValidationFailed,
)
from api.http.body_limit import BodyLimitMiddleware
from api.http.metrics import Metrics, MetricsMiddleware
from api.http.readiness import ServiceState
from api.http.requestlog import RequestLogMiddleware
from api.http.routes import health, model, predict, v2
from api.http.routes.web import add_web_ui

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadPolicy:
    """What the runner wants around the model load."""

    # end the process (EXIT_LOAD_FAILED) when the load fails: never linger half-started
    exit_on_failure: bool = True
    # start accepting connections only once loaded (Gunicorn workers sharing a socket); else
    # accept at once and answer "loading" (503) meanwhile
    accept_after_load: bool = False


def _fail(policy: LoadPolicy) -> None:
    if policy.exit_on_failure:
        # Fail fast: never linger half-started. Nothing was accepted (predict answered 503).
        logging.shutdown()
        os._exit(EXIT_LOAD_FAILED)


def _switched(view: Any, metrics: Metrics) -> None:
    metrics.load_seconds.set(view.described.get("load_seconds", 0.0))


@dataclass
class Owner:
    """This front-end's hold on the engine process of its group."""

    address: str
    spawner: Any
    exclusive: bool
    link: Any = None


def _owner(settings: Settings, metrics: Metrics) -> Owner:
    from api.cpu import cpu_budget
    from api.remote import wire
    from api.remote.entrypoints import EngineConfig
    from api.remote.frontend.link import EngineLink
    from api.remote.frontend.spawner import EngineSpawner, engine_group

    group, shared = engine_group()
    config = EngineConfig.from_settings(settings, linger_s=settings.engine_linger_s if shared else 0.0)
    device = settings.device.replace(":", "")
    address = wire.address(group, device)
    spawner = EngineSpawner(address, config)
    front = settings.batching_group
    link = EngineLink(
        front, cpu_budget(front.num_threads, workers=front.workers).threads, metrics, stall_s=settings.engine_stall_s
    )
    # an engine restarted after a crash serves the model swapped in last, not the configured one
    link.on_switch.append(lambda view: spawner.follow(view.described["checkpoint_path"]))
    link.on_switch.append(lambda view: _switched(view, metrics))
    return Owner(address, spawner, exclusive=not shared, link=link)


def _log_ready(engine: Pipeline, settings: Settings) -> None:
    """One line that says what is being served and under which limits (never the API key itself)."""
    described = engine.describe()
    summary = {
        "event": "ready",
        **{k: v for k, v in described.items() if k != "class_names"},
        "checkpoint_sha256": described["checkpoint_sha256"][:12],
        "calibration": _calibration_brief(described.get("calibration")),  # its tables: GET /api/v1/model
        "max_upload_mb": settings.max_upload_mb,
        "api_key": "set" if settings.api_key is not None else "not set",
    }
    logger.info(
        "model ready: %s, %d classes (labels: %s)%s, %s %s on %s, %s %s (%s; %s), loaded and warmed up in %.2fs; "
        "batches <= %d, queue <= %d, deadline %gs, uploads <= %g MiB (decode <= %d MB), API key %s%s",
        described["architecture"],
        described["num_classes"],
        described["labels_source"],
        f", {described['fold_count']} folds as one model" if described.get("fold_count", 1) > 1 else "",
        described["checkpoint_path"],
        described["checkpoint_format"],
        described["device"],
        described["runtime"],
        described["precision"],
        described["runtime_reason"],
        described["precision_reason"],
        described["load_seconds"],
        described["max_batch_size"],
        described["max_queue"],
        described["request_timeout_s"],
        settings.max_upload_mb,
        described["decode_budget_mb"],
        summary["api_key"],
        _measured(described.get("evaluation")),
        extra=summary,
    )


def _calibration_brief(calibration: dict[str, Any] | None) -> dict[str, Any] | None:
    if calibration is None:
        return None
    keep = (
        "temperature",
        "source",
        "held_out_images",
        "accuracy",
        "ece_before",
        "ece_after",
        "nll_before",
        "nll_after",
    )
    return {k: calibration[k] for k in keep}


def _measured(evaluation: dict[str, Any] | None) -> str:
    if evaluation is None:
        return ""
    where = f"on {evaluation['held_out_images']} held-out images" if evaluation["images"] else "speed only"
    return f"; measured ({where}): {Evaluation.from_dict(evaluation).summary()}"


def create_app(settings: Settings, *, policy: LoadPolicy | None = None, state: ServiceState | None = None) -> FastAPI:
    """Build the app. `state` is the runner's handle for draining (one is made when not given)."""
    load_policy = policy or LoadPolicy()
    metrics = Metrics()
    service = state or ServiceState()
    service.on_ready = metrics.on_ready

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from api.remote.frontend.supervisor import keep_linked

        owner = app.state.owner = _owner(settings, metrics)
        linked = asyncio.Event()

        def first(link: Pipeline) -> None:
            metrics.load_seconds.set(link.describe().get("load_seconds", 0.0))
            _log_ready(link, settings)

        supervisor = asyncio.create_task(
            keep_linked(
                owner.link,
                owner.address,
                owner.spawner,
                service,
                on_first=first,
                on_failed=lambda: _fail(load_policy),
                linked=linked,
                load_timeout_s=settings.model_load_timeout_s,
            )
        )
        if load_policy.accept_after_load:
            await linked.wait()
        try:
            yield
        finally:
            service.set_stopping()
            supervisor.cancel()
            owner.link.close()  # in-flight requests were finished by the server's drain
            if owner.exclusive:  # the engine stops last: it ends once its only front-end has left
                await asyncio.to_thread(owner.spawner.wait, 30.0)

    app = FastAPI(
        title="cat-breeds-api",
        version=__version__,
        summary="Image classification with a fine-tuned timm model.",
        lifespan=lifespan,
    )
    app.state.http = http = settings.http_group
    app.state.metrics = metrics
    app.state.service = service

    # Bodies are refused while being read once past these limits (413), never buffered whole.
    app.add_middleware(BodyLimitMiddleware, limit_for_path=_body_limits(http), error_body=error_body)
    if http.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(http.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-API-Key"],
        )
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(RequestLogMiddleware)  # outermost: every answer, refusals included, gets an id
    _add_error_handlers(app)
    app.include_router(health.router)
    app.include_router(predict.router)
    app.include_router(model.router)
    app.include_router(v2.router)
    app.include_router(v2.models)
    if http.admin_key is not None:  # model management exists only with its key
        app.include_router(v2.repository)
    if http.web_ui:
        add_web_ui(app)
    return app


def _body_limits(http: HttpSettings) -> Callable[[str], int | None]:
    single = http.max_upload_bytes * 4 // 3 + 64 * 1024  # room for base64 and multipart framing
    limits = {"/api/v1/predict": single, "/api/v1/predict/batch": single * http.max_batch_files}

    def limit_for_path(path: str) -> int | None:
        if path.startswith(v2.PREFIX + "/"):
            return single * http.max_batch_files if path.endswith("/infer") else 64 * 1024
        return limits.get(path)

    return limit_for_path


def error_body(path: str, code: str, message: str) -> dict[str, Any]:
    """/api/v1 answers {"error": {"code", "message"}}; the v2 protocol's clients read {"error": "<message>"}."""
    if path == v2.PREFIX or path.startswith(v2.PREFIX + "/"):
        return {"error": message}
    return {"error": {"code": code, "message": message}}


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def request_error(request: Request, error: RequestError) -> JSONResponse:
        body = error_body(request.url.path, error.code, error.message)
        return JSONResponse(body, status_code=error.status, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in item['loc'])}: {item['msg']}" for item in error.errors())
        return await request_error(request, ValidationFailed(problems or "invalid request"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        """The framework's own refusals (no such route, wrong method), as the tree's classes."""
        known: dict[int, type[RequestError]] = {404: NotFound, 405: MethodNotAllowed, 413: PayloadTooLarge}
        headers = getattr(error, "headers", None)
        mapped = known.get(error.status_code)
        as_tree = (
            mapped(str(error.detail), headers=headers)
            if mapped is not None
            else HttpError(str(error.detail), status=error.status_code, headers=headers)
        )
        return await request_error(request, as_tree)
