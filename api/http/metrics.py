"""Prometheus metrics (`cat_breeds_api_*`), one registry per app so tests can build many apps.

Under Gunicorn every worker is its own process: prometheus-client's multiprocess mode (the
`PROMETHEUS_MULTIPROC_DIR` that `api.gunicorn_conf` sets before the workers start) writes each
worker's values to files, and a scrape of any worker aggregates all of them. Without it a scrape
would see one worker's share (N/2 requests for 2 workers).
"""

from __future__ import annotations

import os
import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess as prometheus_multiprocess
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.engine.serving.figures import LATENCY_BUCKETS, PREFIX

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Where a prediction's time goes: reading the upload, decode + preprocess, waiting for a batch, the forward pass.
STAGES = ("read", "decode", "queue", "forward")


def multiprocess_mode() -> bool:
    return bool(os.environ.get(MULTIPROC_ENV))


class Metrics:
    """The HTTP side's figures. The engine's (batches, forward time, queue depth) come from the engine
    process: `exposition(engine=...)` appends them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.requests = Counter(
            f"{PREFIX}_http_requests_total",
            "HTTP requests answered, by route template, method and status.",
            ["route", "method", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            f"{PREFIX}_http_request_duration_seconds",
            "Time to answer an HTTP request, by route template.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            f"{PREFIX}_http_requests_in_flight",
            "Requests being handled right now (for autoscaling).",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.images = Counter(
            f"{PREFIX}_images_total",
            "Images received, by outcome (ok or the error code).",
            ["outcome"],
            registry=registry,
        )
        self.stage = Histogram(
            f"{PREFIX}_stage_duration_seconds",
            "Per image: read (upload received), decode (decode + preprocess), queue (waiting for a batch), "
            "forward (the forward pass of its batch).",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.rejected = Counter(
            f"{PREFIX}_rejected_total",
            "Requests refused or abandoned, by reason (overloaded, timeout).",
            ["reason"],
            registry=registry,
        )
        self.ready = Gauge(
            f"{PREFIX}_model_ready",
            "1 when the model is loaded and warm (the least ready worker under Gunicorn).",
            registry=registry,
            multiprocess_mode="livemin",
        )
        self.load_seconds = Gauge(
            f"{PREFIX}_model_load_seconds",
            "Time the model took to load and warm up (the slowest worker under Gunicorn).",
            registry=registry,
            multiprocess_mode="livemax",
        )
        for stage in STAGES:  # exported from the start, so dashboards see zeros, not gaps
            self.stage.labels(stage)

    # --- what the engine link and readiness report ----------------------------------------------

    def on_stage(self, stage: str, seconds: float) -> None:
        self.stage.labels(stage).observe(seconds)

    def on_images(self, outcome: str, count: int = 1) -> None:
        """Images answered, by outcome ("ok" or the error's code); refusals also by reason."""
        self.images.labels(outcome).inc(count)
        if outcome in ("overloaded", "timeout"):
            self.rejected.labels(outcome).inc(count)

    def on_ready(self, ready: bool) -> None:
        self.ready.set(1 if ready else 0)

    def exposition(self, engine: bytes = b"") -> Response:
        """The scrape: every worker's figures under Gunicorn, this process's otherwise, then the
        engine process's own (once, whichever front-end answers)."""
        if multiprocess_mode():
            registry = CollectorRegistry()
            prometheus_multiprocess.MultiProcessCollector(registry)
        else:
            registry = self.registry
        return Response(generate_latest(registry) + engine, media_type=CONTENT_TYPE_LATEST)


class MetricsMiddleware:
    """Count and time every HTTP request under its route template (bounded label values).

    Plain ASGI (Starlette's BaseHTTPMiddleware would add a task and a stream per request): the
    status comes from the response-start message, the template from the route the router matched
    (it records it in the shared scope); the time runs until the body is sent.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # unless a response starts: the app raised

        async def send_observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_observed)
        finally:
            self.metrics.in_flight.dec()
            route = str(getattr(scope.get("route"), "path", "unmatched"))
            self.metrics.requests.labels(route, scope["method"], str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)
