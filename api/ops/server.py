"""The server processes: `cat-breeds-api serve` (uvicorn) and Gunicorn's workers drain on SIGTERM.

The first SIGTERM (or Ctrl-C) turns readiness to 503 at once, so a load balancer or Kubernetes
stops sending new work, while predictions are still answered for `API_SHUTDOWN_DELAY_S`; then
uvicorn's graceful shutdown stops accepting connections, finishes the requests in flight (up to
`API_GRACEFUL_TIMEOUT_S`) and exits. A second signal skips the delay.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any, ClassVar

import uvicorn
from gunicorn.arbiter import Arbiter
from uvicorn_worker import UvicornWorker

from api.config import Settings, get_settings
from api.errors import EXIT_LOAD_FAILED

logger = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, *, delay_s: float, on_drain: Callable[[], None]):
        super().__init__(config)
        self.delay_s = delay_s
        self.on_drain = on_drain
        self._draining = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining:  # asked again: no more waiting
            super().handle_exit(sig, frame)
            return
        self._draining = True
        self.on_drain()
        if self.delay_s <= 0:
            super().handle_exit(sig, frame)
            return
        logger.info("signal %d: not ready; serving %.1fs more before draining", sig, self.delay_s)
        timer = threading.Timer(self.delay_s, super().handle_exit, (sig, frame))
        timer.daemon = True
        timer.start()


def serve(settings: Settings, **config: Any) -> None:
    """uvicorn.run with draining (what `cat-breeds-api serve` runs): answers "loading" meanwhile."""
    from api.http.app import LoadPolicy, create_app
    from api.http.readiness import ServiceState

    state = ServiceState()
    app = create_app(settings, policy=LoadPolicy(exit_on_failure=True), state=state)
    process = settings.process_group
    server = DrainingServer(
        uvicorn.Config(app, timeout_graceful_shutdown=math.ceil(process.graceful_timeout_s), **config),
        delay_s=process.shutdown_delay_s,
        on_drain=state.set_draining,
    )
    server.run()
    if not server.started:
        sys.exit(EXIT_LOAD_FAILED)  # as uvicorn.run: never started (port taken, failed lifespan)


class Worker(UvicornWorker):
    """Gunicorn's Uvicorn worker, draining like `serve` (api.gunicorn_conf selects it).

    Unlike `serve`, which answers "loading" while its model loads, a worker accepts connections only
    once its model is ready: the workers share one listening socket, so a loading or restarted
    worker must not take connections that a ready one would answer.
    """

    CONFIG_KWARGS: ClassVar[dict[str, Any]] = {
        "loop": "auto",
        "http": "auto",
        "server_header": False,  # no software/version banner in responses
        "access_log": False,  # api.access writes one structured line per request
    }

    async def _serve(self) -> None:
        # The app Gunicorn imported (`api.main:app`) only proves the settings valid in the master;
        # each worker builds its own with the policy it needs: accept once the model is loaded.
        # (Imported here: Gunicorn's master imports this module for the worker class, and must
        # never load torch.)
        from api.http.app import LoadPolicy, create_app
        from api.http.readiness import ServiceState

        settings = get_settings()
        state = ServiceState()
        self.config.app = create_app(settings, policy=LoadPolicy(accept_after_load=True), state=state)
        process = settings.process_group
        self.config.timeout_graceful_shutdown = math.ceil(process.graceful_timeout_s)
        server = DrainingServer(self.config, delay_s=process.shutdown_delay_s, on_drain=state.set_draining)
        self._install_sigquit_handler()
        heartbeat = asyncio.create_task(self._heartbeat_until_started(server))
        try:
            await server.serve(sockets=self.sockets)
        finally:
            heartbeat.cancel()
        if not server.started:
            sys.exit(Arbiter.WORKER_BOOT_ERROR)

    async def _heartbeat_until_started(self, server: uvicorn.Server) -> None:
        """Tell the master this worker is alive while its model loads (uvicorn's own heartbeat
        starts with the server), so a load longer than Gunicorn's timeout is not a hung worker."""
        while not server.started:
            self.notify()
            await asyncio.sleep(1.0)
