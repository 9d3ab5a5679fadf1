"""Gunicorn settings for production: `gunicorn -c python:api.gunicorn_conf api.main:app`.

Everything comes from the service's own settings (`API_*`, `WEB_CONCURRENCY`, `LOG_LEVEL`), so a bad
value stops the master with the same one line as `cat-breeds-api serve`. Workers are
`api.ops.server.Worker` (Uvicorn, draining on SIGTERM); each loads its own model after the fork (no
preload: CUDA is never initialised in the master) and accepts connections only once it is ready.
Metrics are aggregated over the workers with prometheus-client's multiprocess mode, in a directory
emptied when the master starts.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

# Before anything imports prometheus_client: that import decides where metric values are kept, and
# the workers inherit the decision. A directory of our own unless the operator names one.
_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_own_metrics_dir = not os.environ.get(_MULTIPROC_ENV)
if _own_metrics_dir:
    os.environ[_MULTIPROC_ENV] = tempfile.mkdtemp(prefix="cat-breeds-api-metrics-")
_metrics_dir = Path(os.environ[_MULTIPROC_ENV])
# The workers are one group: they share one engine process (api/remote/frontend/spawner.py, engine_group).
os.environ.setdefault("API_ENGINE_GROUP", f"gunicorn-{os.getpid()}")

from api.config import ConfigError, load_settings  # noqa: E402 (after the environment is set)
from api.errors import EXIT_BAD_CONFIG  # noqa: E402
from api.logs import formatter  # noqa: E402

try:
    _settings = load_settings()
except ConfigError as error:
    sys.stderr.write(f"configuration error: {error}\n")
    sys.exit(EXIT_BAD_CONFIG)

bind = [f"{_settings.host}:{_settings.port}"]
workers = _settings.workers
worker_class = "api.ops.server.Worker"
# A worker answers heartbeats from its event loop, also while its model loads (off the loop), so 120 s is ample.
timeout = 120
# Room for the not-ready delay and the drain; Compose's stop_grace_period must exceed it.
graceful_timeout = int(_settings.shutdown_delay_s + _settings.graceful_timeout_s) + 1
keepalive = 5
accesslog = None  # api.access writes one structured line per request
loglevel = _settings.log_level.lower()
logconfig_dict: dict[str, Any] = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"service": {"()": formatter, "log_format": _settings.log_format}},
    "handlers": {"stdout": {"class": "logging.StreamHandler", "formatter": "service", "stream": "ext://sys.stdout"}},
    "root": {"handlers": ["stdout"], "level": loglevel.upper()},
    "loggers": {"gunicorn.error": {"handlers": ["stdout"], "level": loglevel.upper(), "propagate": False}},
}


def on_starting(server: Any) -> None:
    """Start from zero: files left by an earlier run would be added to this run's figures."""
    shutil.rmtree(_metrics_dir, ignore_errors=True)
    _metrics_dir.mkdir(parents=True, exist_ok=True)


def child_exit(server: Any, worker: Any) -> None:
    """A worker ended (crash, kill, restart): drop its live gauges; its counters stay in the totals."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server: Any) -> None:
    if _own_metrics_dir:
        shutil.rmtree(_metrics_dir, ignore_errors=True)
