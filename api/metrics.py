"""Prometheus metrics, one registry per app so tests can build many apps in one process."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.requests import Request
from starlette.responses import Response

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "cat_breeds_http_requests_total",
            "HTTP requests answered, by route template, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "cat_breeds_http_request_duration_seconds",
            "Time to answer an HTTP request, by route template.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "cat_breeds_http_requests_in_flight",
            "Requests being handled right now (for autoscaling).",
            registry=self.registry,
        )
        self.images = Counter(
            "cat_breeds_images_total",
            "Images received, by outcome (ok or the error code).",
            ["outcome"],
            registry=self.registry,
        )
        self.inference = Histogram(
            "cat_breeds_inference_duration_seconds",
            "Forward pass time per batch.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "cat_breeds_inference_batch_size",
            "Images per forward pass.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "cat_breeds_queue_depth",
            "Images admitted and not yet answered (decoding, queued or in a forward pass).",
            registry=self.registry,
        )
        self.rejected = Counter(
            "cat_breeds_rejected_total",
            "Requests refused or abandoned, by reason (overloaded, timeout).",
            ["reason"],
            registry=self.registry,
        )
        self.ready = Gauge("cat_breeds_model_ready", "1 when the model is loaded and warm.", registry=self.registry)
        self.load_seconds = Gauge(
            "cat_breeds_model_load_seconds", "Time the model took to load and warm up.", registry=self.registry
        )

    async def middleware(self, request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        """Count and time every request under its route template (bounded label values)."""
        started = time.perf_counter()
        self.in_flight.inc()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            self.in_flight.dec()
            route = _route_template(request)
            self.requests.labels(route, request.method, str(status)).inc()
            self.latency.labels(route).observe(time.perf_counter() - started)


def _route_template(request: Request) -> str:
    # The router records the matched route in the scope; its path template keeps label values bounded.
    route = request.scope.get("route")
    return str(getattr(route, "path", "unmatched"))
