"""A process of its own for work the engine must be able to stop: killed at a deadline, above a memory
ceiling, or when the caller gives up; its memory goes back to the system with it.

A swap builds its new model here first (api/remote/host/prepare.py): whatever the file does to the
loader (endless reads, a decompression bomb, a hang) happens to this process, never to the engine.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

POLL_S = 0.02
MIB = 1024 * 1024


class AsideFailed(Exception):
    """The process did not finish its work; the message says why, for the caller's answer."""


@dataclass(frozen=True)
class Finished:
    seconds: float
    peak_bytes: int  # the most resident memory seen


def run_aside(
    argv: list[str],
    payload: bytes,
    *,
    timeout_s: float,
    memory_limit: int,
    cancel: threading.Event | None = None,
    env: dict[str, str] | None = None,
) -> Finished:
    """Run `argv` with `payload` on its stdin until it exits 0. Raises AsideFailed when it exits
    otherwise (its last line of output is the reason), passes `timeout_s`, holds more than
    `memory_limit` bytes, or `cancel` is set; the process is killed and reaped before that."""
    started = time.monotonic()
    peak = 0
    with tempfile.TemporaryFile() as output:
        process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=output, stderr=None, env=env)
        try:
            assert process.stdin is not None
            with contextlib.suppress(BrokenPipeError):
                process.stdin.write(payload)
                process.stdin.close()
            while process.poll() is None:
                peak = max(peak, resident_bytes(process.pid))
                elapsed = time.monotonic() - started
                if peak > memory_limit:
                    raise AsideFailed(
                        f"it took more than {memory_limit / MIB:.0f} MiB of memory to load (the room left for "
                        f"a second model); it was stopped"
                    )
                if elapsed > timeout_s:
                    raise AsideFailed(
                        f"it did not load within {timeout_s:g}s (API_MODEL_LOAD_TIMEOUT_S); it was stopped"
                    )
                if cancel is not None and cancel.is_set():
                    raise AsideFailed("the load was abandoned")
                time.sleep(POLL_S)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        if process.returncode != 0:
            output.seek(0)
            lines = output.read().decode(errors="replace").strip().splitlines()
            why = lines[-1] if lines else f"exit status {process.returncode}"
            if process.returncode < 0:
                why = f"the process building it ended by signal {-process.returncode}"
            raise AsideFailed(why)
    return Finished(time.monotonic() - started, peak)


def resident_bytes(pid: int) -> int:
    """A process's resident memory (VmRSS), 0 once it has gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0
