"""Readiness: what the service can honestly say about itself at any moment.

`loading` until the model is loaded and warmed up, then `ready`; `failed` (with the reason) when
the load failed; `draining` after SIGTERM (readiness says 503 so load balancers stop sending, while
predictions are still served); `stopping` once shutdown began. Liveness is separate: the process
answers.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

from api.batching import Batcher
from api.errors import ServiceUnavailable
from api.model import Classifier

Status = Literal["loading", "ready", "failed", "draining", "stopping"]


@dataclass(frozen=True)
class Serving:
    """What answers predictions once ready: the model, its batcher and the decode pool."""

    classifier: Classifier
    batcher: Batcher
    decoder: ThreadPoolExecutor

    def close(self) -> None:
        self.batcher.close()
        self.decoder.shutdown(wait=True)


@dataclass
class ServiceState:
    status: Status = "loading"
    reason: str | None = "loading the model"
    serving: Serving | None = None
    started_at: float = field(default_factory=time.monotonic)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def ready(self) -> bool:
        return self.status == "ready"

    @property
    def classifier(self) -> Classifier | None:
        return self.serving.classifier if self.serving else None

    @property
    def uptime_s(self) -> float:
        return time.monotonic() - self.started_at

    def set_ready(self, serving: Serving) -> None:
        with self._lock:
            if self.status in ("loading", "draining"):  # draining: still serve, still close it at the end
                self.serving = serving
            if self.status == "loading":
                self.status, self.reason = "ready", None

    def set_failed(self, reason: str) -> None:
        with self._lock:
            self.status, self.reason = "failed", reason

    def set_draining(self) -> None:
        with self._lock:
            if self.status in ("loading", "ready"):
                self.status, self.reason = "draining", "shutting down: finishing in-flight requests"

    def set_stopping(self) -> None:
        with self._lock:
            self.status, self.reason = "stopping", "the service is shutting down"

    def require_ready(self) -> Serving:
        """What serves predictions, or a 503 that says why nothing does."""
        serving = self.serving
        if self.status not in ("ready", "draining") or serving is None:
            retry = 5 if self.status == "loading" else 30
            raise ServiceUnavailable(f"model not ready: {self.reason}", retry_after_s=retry)
        return serving
