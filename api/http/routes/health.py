"""Liveness, readiness and Prometheus metrics: open to orchestrators, never touching the model."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response

from api.http.deps import MetricsDep, StateDep
from api.http.schemas import Health, Liveness

router = APIRouter(tags=["health"])

_NOT_READY: dict[int | str, dict[str, Any]] = {
    503: {"model": Health, "description": "Loading, failed to load, draining or shutting down."}
}


def _health(state: StateDep, response: Response) -> Health:
    served = state.served
    if not state.ready:
        response.status_code = 503
        response.headers["Retry-After"] = "5"
    return Health(
        status=state.status,
        ready=state.ready,
        reason=state.reason,
        architecture=served.architecture if served else None,
        device=served.device if served else None,
        uptime_s=round(state.uptime_s, 3),
    )


@router.get("/health", response_model=Health, responses=_NOT_READY, summary="Ready to predict?")
async def health(state: StateDep, response: Response) -> Health:
    """200 once the model is loaded and warmed up; 503 with the reason while loading or after a failure."""
    return _health(state, response)


@router.get("/health/ready", response_model=Health, responses=_NOT_READY, summary="Readiness probe")
async def ready(state: StateDep, response: Response) -> Health:
    """Same answer as /health, for orchestrators' readiness/startup probes."""
    return _health(state, response)


@router.get("/health/live", response_model=Liveness, summary="Liveness probe")
async def live() -> Liveness:
    """200 whenever the process answers HTTP, even while the model is still loading."""
    return Liveness()


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(metrics: MetricsDep, state: StateDep) -> Response:
    """Prometheus text format (`cat_breeds_api_*`): requests and latency by route and status, stages,
    inference time, batch size, queue depth, rejections, readiness, load time, GPU memory."""
    engine_metrics = getattr(state.engine, "engine_metrics", None)  # the engine process's figures
    return metrics.exposition(engine=await engine_metrics() if engine_metrics else b"")
