"""Readiness: what the service can honestly say about itself at any moment.

`loading` until the model is loaded and warmed up, then `ready`; `recovering` while the engine
process is replaced (it died or stalled: readiness says 503, while predictions are accepted and wait
for the next engine within their deadline); `failed` (with the reason) when the load failed;
`draining` after SIGTERM (readiness says 503 so load balancers stop sending, while predictions are
still served); `stopping` once shutdown began. Liveness is separate: the process answers.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from api.engine.model.served import Served
from api.engine.serving.pipeline import Pipeline
from api.errors import ServiceUnavailable

Status = Literal["loading", "ready", "recovering", "failed", "draining", "stopping"]
ReadyObserver = Callable[[bool], None]


def _ignore(ready: bool) -> None:
    pass


@dataclass
class ServiceState:
    """The one writer of readiness; `on_ready` (the ready gauge) observes every change."""

    status: Status = "loading"
    reason: str | None = "loading the model"
    engine: Pipeline | None = None
    on_ready: ReadyObserver = _ignore
    started_at: float = field(default_factory=time.monotonic)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def ready(self) -> bool:
        return self.status == "ready"

    @property
    def served(self) -> Served | None:
        return self.engine.served if self.engine else None

    @property
    def uptime_s(self) -> float:
        return time.monotonic() - self.started_at

    def set_ready(self, engine: Pipeline) -> None:
        with self._lock:
            if self.status in ("loading", "recovering", "draining"):  # draining: still serve, still close it
                self.engine = engine
            if self.status in ("loading", "recovering"):
                self.status, self.reason = "ready", None
        self.on_ready(self.ready)

    def set_recovering(self, reason: str) -> None:
        """The engine process went away (or stalled) and is being replaced: readiness 503, while
        predictions are still accepted (they wait for the next engine within their deadline)."""
        with self._lock:
            if self.status == "ready":
                self.status, self.reason = "recovering", reason
        self.on_ready(False)

    def set_failed(self, reason: str) -> None:
        with self._lock:
            self.status, self.reason = "failed", reason
        self.on_ready(False)

    def set_draining(self) -> None:
        with self._lock:
            if self.status in ("loading", "ready"):
                self.status, self.reason = "draining", "shutting down: finishing in-flight requests"
        self.on_ready(False)

    def set_stopping(self) -> None:
        with self._lock:
            self.status, self.reason = "stopping", "the service is shutting down"
        self.on_ready(False)

    def require_ready(self) -> Pipeline:
        """What serves predictions, or a 503 that says why nothing does."""
        engine = self.engine
        if self.status not in ("ready", "recovering", "draining") or engine is None:
            retry = 5 if self.status == "loading" else 30
            raise ServiceUnavailable(f"model not ready: {self.reason}", retry_after_s=retry)
        return engine
