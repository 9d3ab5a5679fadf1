"""The app factory: settings -> middleware, routes, error mapping and the engine-starting lifespan.

Nothing heavy happens in `create_app`: the engine starts in the lifespan, off the event loop.
Runners say what they need explicitly (`LoadPolicy`), and hand in the `ServiceState` they drain.
"""

from __future__ import annotations

import asyncio
import dataclasses
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
from api.engine.pipeline import Pipeline
from api.errors import RequestError, StartupError
from api.http.body_limit import BodyLimitMiddleware
from api.http.metrics import Metrics, MetricsMiddleware
from api.http.readiness import ServiceState
from api.http.requestlog import RequestLogMiddleware
from api.http.routes import health, model, predict, v2
from api.http.routes.web import add_web_ui

logger = logging.getLogger(__name__)

# Exit status after a failed model load: gunicorn reads 3 as "worker failed to boot" and stops
# instead of restarting workers that would fail the same way.
EXIT_LOAD_FAILED = 3
EXIT_BAD_CONFIG = 2


@dataclass(frozen=True)
class LoadPolicy:
    """What the runner wants around the model load."""

    # end the process (EXIT_LOAD_FAILED) when the load fails: never linger half-started
    exit_on_failure: bool = True
    # start accepting connections only once loaded (Gunicorn workers sharing a socket); else
    # accept at once and answer "loading" (503) meanwhile
    accept_after_load: bool = False


async def _start_engine(settings: Settings, state: ServiceState, metrics: Metrics, policy: LoadPolicy) -> None:
    """In-process mode: this process loads the model."""
    from api.engine.service import Engine  # torch: only in this mode

    try:
        engine = await asyncio.to_thread(Engine.start, settings.model_group, settings.batching_group, metrics)
    except StartupError as error:
        state.set_failed(str(error))
        logger.error("model load failed: %s", error)
    except Exception as error:  # an unforeseen failure must still end "loading", with its traceback logged
        state.set_failed(f"unexpected {type(error).__name__} while loading the model: {error}")
        logger.exception("model load failed unexpectedly")
    else:
        state.set_ready(engine)
        metrics.on_model(engine.served)
        metrics.load_seconds.set(engine.classifier.load_seconds)
        _log_ready(engine, settings)
        return
    _fail(policy)


def _fail(policy: LoadPolicy) -> None:
    if policy.exit_on_failure:
        # Fail fast: never linger half-started. Nothing was accepted (predict answered 503).
        logging.shutdown()
        os._exit(EXIT_LOAD_FAILED)


async def _link_engine(
    settings: Settings, state: ServiceState, metrics: Metrics, policy: LoadPolicy, linked: asyncio.Event, owner: Owner
) -> None:
    """Process mode: connect to the group's engine process (starting it if none answers), and again
    whenever it goes away, until this front-end stops. Readiness follows the link."""
    from api.engine.cpu import cpu_budget
    from api.engine.link import EngineLink

    batching = settings.batching_group
    threads = cpu_budget(batching.num_threads, workers=batching.workers).threads
    first = True
    while True:
        try:
            link = await EngineLink.connect(owner.address, owner.spawner, batching, threads, metrics)
        except StartupError as error:
            state.set_failed(str(error))
            logger.error("model load failed: %s", error)
            linked.set()
            _fail(policy)
            return
        except ConnectionError as error:  # it died while loading: start the next one
            logger.warning("engine process lost while loading (%s); starting it again", error)
            await asyncio.sleep(0.2)
            continue
        owner.link = link
        link.on_switch = lambda view: _switched(view, owner, metrics)
        state.set_ready(link)
        linked.set()
        if first:
            metrics.load_seconds.set(link.describe().get("load_seconds", 0.0))
            _log_ready(link, settings)
            first = False
        else:
            logger.info("engine process connected again: ready")
        await link.lost.wait()
        state.set_lost(f"{link.lost_reason}; connecting again")
        logger.error("lost the engine process (%s): answering 503 until it is back", link.lost_reason)


def _switched(view: Any, owner: Owner, metrics: Metrics) -> None:
    """The model was swapped: an engine restarted after a crash serves the new one too."""
    owner.spawner.follow(view.described["checkpoint_path"])
    metrics.load_seconds.set(view.described.get("load_seconds", 0.0))


@dataclass
class Owner:
    """This front-end's hold on the engine process of its group."""

    address: str
    spawner: Any
    exclusive: bool
    link: Any = None


def _owner(settings: Settings) -> Owner:
    from api.engine import wire
    from api.engine.link import EngineConfig, EngineSpawner, engine_group

    group, shared = engine_group()
    batching = dataclasses.replace(settings.batching_group, workers=1)  # the engine has the CPUs to itself
    config = EngineConfig(
        settings.model_group,
        batching,
        settings.engine_linger_s if shared else 0.0,
        settings.log_level,
        settings.log_dir,
        settings.log_format,
    )
    device = settings.device.replace(":", "")
    address = wire.address(group, device)
    return Owner(address, EngineSpawner(address, config), exclusive=not shared)


def _log_ready(engine: Pipeline, settings: Settings) -> None:
    """One line that says what is being served and under which limits (never the API key itself)."""
    described = engine.describe()
    summary = {
        "event": "ready",
        **{k: v for k, v in described.items() if k != "class_names"},
        "checkpoint_sha256": described["checkpoint_sha256"][:12],
        "max_upload_mb": settings.max_upload_mb,
        "api_key": "set" if settings.api_key is not None else "not set",
    }
    logger.info(
        "model ready: %s, %d classes (labels: %s), %s %s on %s, %s %s (%s; %s), loaded and warmed up in %.2fs; "
        "batches <= %d, queue <= %d, deadline %gs, uploads <= %g MiB (decode <= %d MB), API key %s",
        described["architecture"],
        described["num_classes"],
        described["labels_source"],
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
        extra=summary,
    )


def create_app(settings: Settings, *, policy: LoadPolicy | None = None, state: ServiceState | None = None) -> FastAPI:
    """Build the app. `state` is the runner's handle for draining (one is made when not given)."""
    load_policy = policy or LoadPolicy()
    in_process = settings.inference == "inprocess"
    metrics = Metrics(engine_figures=in_process)
    service = state or ServiceState()
    service.on_ready = metrics.on_ready

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if in_process:
            loader = asyncio.create_task(_start_engine(settings, service, metrics, load_policy))
            if load_policy.accept_after_load:
                # Gunicorn worker: the server starts accepting when the lifespan has started, so other,
                # ready workers take every connection until this one's model is loaded (none meets a 503)
                await loader
            try:
                yield
            finally:
                service.set_stopping()
                loader.cancel()
                if service.engine is not None:
                    await asyncio.to_thread(service.engine.close)
            return
        owner = app.state.owner = _owner(settings)
        linked = asyncio.Event()
        supervisor = asyncio.create_task(_link_engine(settings, service, metrics, load_policy, linked, owner))
        if load_policy.accept_after_load:
            await linked.wait()
        try:
            yield
        finally:
            service.set_stopping()
            supervisor.cancel()
            if owner.link is not None:
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


def _error(
    request: Request, status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(request.url.path, code, message), status_code=status, headers=headers)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def request_error(request: Request, error: RequestError) -> JSONResponse:
        return _error(request, error.status, error.code, error.message, error.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in item['loc'])}: {item['msg']}" for item in error.errors())
        return _error(request, 422, "validation_error", problems or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
        return _error(
            request,
            error.status_code,
            codes.get(error.status_code, f"http_{error.status_code}"),
            str(error.detail),
            getattr(error, "headers", None),
        )
