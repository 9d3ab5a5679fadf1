"""Keeping a front-end linked to its group's engine process: connect (starting one if none answers),
connect again whenever it goes, and replace one that stalls.

Readiness follows: ready while linked; "recovering" (503, while requests still wait for the next
engine, api/remote/frontend/link.py) from the moment an engine is lost or found stalled; "failed"
when an engine cannot load the model at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from typing import Protocol

from api.engine.serving.pipeline import Pipeline
from api.errors import StartupError
from api.remote import wire
from api.remote.frontend.link import EngineLink
from api.remote.frontend.spawner import EngineSpawner, kill_engine
from api.remote.messages import Hello, MalformedMessage, Refused

logger = logging.getLogger(__name__)

RETRY_S = 0.05


class Readiness(Protocol):
    """What the supervisor tells (api/http/readiness.py's ServiceState)."""

    def set_ready(self, engine: Pipeline) -> None: ...
    def set_recovering(self, reason: str) -> None: ...
    def set_failed(self, reason: str) -> None: ...


async def connect(
    address: str, spawn: EngineSpawner, *, load_timeout_s: float | None = None
) -> tuple[socket.socket, Hello, wire.Board]:
    """Connect to the group's engine, starting one if none answers; returns once it is loaded.
    Raises StartupError when it cannot load the model, ConnectionError when it went away or (with
    `load_timeout_s`) did not load in time, in which case it is killed."""
    loop = asyncio.get_running_loop()
    deadline = None if load_timeout_s is None else time.monotonic() + load_timeout_s
    spawn.forget()
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.connect(address)
            break
        except (ConnectionRefusedError, FileNotFoundError):
            sock.close()
        code = spawn.failed()
        if code is not None:
            raise StartupError(f"the engine process exited with status {code} before serving (see its log)")
        if deadline is not None and time.monotonic() > deadline and spawn.process is not None:
            kill_engine(spawn.process.pid)  # it did not even bind its socket
            raise ConnectionError(f"the engine process did not start within {load_timeout_s:g}s: killed it")
        spawn()
        await asyncio.sleep(RETRY_S)
    receiving = loop.run_in_executor(None, wire.receive, sock)
    left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
    try:
        message, fds = await asyncio.wait_for(asyncio.shield(receiving), left)
    except TimeoutError:
        pid = wire.peer_pid(sock)
        kill_engine(pid)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)  # wakes the receiving thread
        with contextlib.suppress(Exception):
            await receiving
        sock.close()
        raise ConnectionError(
            f"the engine process (pid {pid}) did not load within {load_timeout_s:g}s (API_MODEL_LOAD_TIMEOUT_S): "
            "killed it"
        ) from None
    except MalformedMessage as error:
        sock.close()
        raise ConnectionError(f"the engine process sent {error}") from None
    except BaseException:
        sock.close()
        raise
    if isinstance(message, Refused):
        sock.close()
        raise StartupError(message.error)
    if not isinstance(message, Hello) or not fds:
        sock.close()
        raise ConnectionError("the engine process went away while loading")
    return sock, message, wire.Board(fds[0])


async def keep_linked(
    link: EngineLink,
    address: str,
    spawn: EngineSpawner,
    readiness: Readiness,
    *,
    on_first: Callable[[EngineLink], None],
    on_failed: Callable[[], None],
    linked: asyncio.Event,
    load_timeout_s: float,
) -> None:
    """Link `link` to an engine, and again to the next whenever one is lost or stalls, until cancelled.
    A restarted engine that has not loaded within `load_timeout_s` (stalled while loading: its model
    was loaded before, from the cache) is killed and started again; the first start has no bound."""
    first = True
    while True:
        try:
            sock, hello, board = await connect(address, spawn, load_timeout_s=None if first else load_timeout_s)
        except StartupError as error:
            readiness.set_failed(str(error))
            logger.error("model load failed: %s", error)
            linked.set()
            on_failed()
            return
        except ConnectionError as error:  # it died while loading: start the next one
            logger.warning("engine process lost while loading (%s); starting it again", error)
            await asyncio.sleep(0.2)
            continue
        link.attach(sock, hello, board)
        readiness.set_ready(link)
        linked.set()
        if first:
            on_first(link)
            first = False
        else:
            logger.info("engine process connected again: ready")
        reason = await watch(link)
        readiness.set_recovering(f"{reason}; connecting again")
        logger.error("lost the engine process (%s): requests wait for the next one (readiness 503)", reason)


async def watch(link: EngineLink) -> str:
    """Until the engine is lost; one that stalls (`EngineLink.stalled`) is killed first. Answers why."""
    period = min(0.25, link.liveness.stall_s / 4)
    while not link.lost.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(link.lost.wait(), timeout=period)
        stalled = link.stalled(time.monotonic())
        if stalled is not None:
            logger.error("%s (API_ENGINE_STALL_S=%g): replacing it", stalled, link.liveness.stall_s)
            link.kill_engine(stalled)
    return link.lost_reason
