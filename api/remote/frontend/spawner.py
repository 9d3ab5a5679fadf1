"""Which front-ends share an engine process, and starting it.

Several front-ends may start one at once: the engine binds its socket before anything else, so the
extra ones end at once (status 0) and every front-end connects to the one that bound it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import pickle
import secrets
import signal
import subprocess
from pathlib import Path

from api.remote import entrypoints
from api.remote.entrypoints import EngineConfig

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
GROUP_ENV = "API_ENGINE_GROUP"


class EngineSpawner:
    """Starts the group's engine process (as this process's child, so it is reaped)."""

    def __init__(self, address: str, config: EngineConfig):
        self.address = address
        self.config = config
        self.process: subprocess.Popen[bytes] | None = None

    def __call__(self) -> None:
        if self.process is not None and self.process.poll() is None:
            return  # ours is still starting
        env = {k: v for k, v in os.environ.items() if k != MULTIPROC_ENV}  # its figures are its own
        self.process = subprocess.Popen(
            entrypoints.command(entrypoints.ENGINE, self.address.lstrip("\0")), stdin=subprocess.PIPE, env=env
        )
        assert self.process.stdin is not None
        self.process.stdin.write(pickle.dumps(self.config))
        self.process.stdin.close()

    def follow(self, checkpoint: str) -> None:
        """The served model was swapped: an engine started from now on (after a crash) loads that one."""
        self.config = dataclasses.replace(self.config, swapped_in=Path(checkpoint))

    def forget(self) -> None:
        """A new attempt: an engine of ours that ended before (killed, say) is reaped and forgotten."""
        if self.process is not None and self.process.poll() is not None:
            self.process = None

    def failed(self) -> int | None:
        """The exit status of the engine we started if it ended with an error before serving (a lost
        race ends with 0; one killed by a signal is started again)."""
        code = self.process.poll() if self.process is not None else None
        return code if code is not None and code > 0 else None

    def wait(self, timeout_s: float) -> None:
        """The engine stops last: wait for ours to end (it does once no front-end is connected)."""
        if self.process is not None:
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.terminate()
                self.process.wait(5)


def kill_engine(pid: int) -> None:
    """SIGKILL the engine process `pid`, unless that pid is no engine (it ended and was reused)."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return
    if entrypoints.ENGINE in command:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def engine_group() -> tuple[str, bool]:
    """Which front-ends share an engine, and whether this one shares it.

    Gunicorn's master names its group (API_ENGINE_GROUP, api/gunicorn_conf.py); uvicorn's
    `--workers` and `--reload` start workers as multiprocessing children of one supervisor, whose pid
    names theirs. A lone server process gets an engine of its own, which ends with it."""
    group = os.environ.get(GROUP_ENV)
    if group:
        return group, True
    parent = multiprocessing.parent_process()
    if parent is not None and parent.pid:
        return f"uvicorn-{parent.pid}", True
    return f"{os.getpid()}-{secrets.token_hex(4)}", False
