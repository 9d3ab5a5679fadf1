"""explain=true: Grad-CAM (api/engine/model/explain.py) in a process of its own, beside the engine.

Explanations run PyTorch forward and backward passes, tens of times the cost of a prediction. They
must not starve predictions, so they run:
- in a process of its own, started on the first explanation (the served model's folds read again as
  PyTorch modules: the engine may serve OpenVINO and hold no PyTorch copy), at idle priority
  (SCHED_IDLE: it runs only on CPU time nothing else wants) and on one thread;
- one at a time, at most API_MAX_EXPLANATIONS admitted at once over every front-end (waiting or
  running): beyond, 503 with Retry-After, at once;
- for the model that answered: after a swap the process is replaced by one for the new model.

The pixels come from the request's ring slot (the front-end wrote them there as for a prediction) and
the heatmap goes back there, as H x W uint8; `Explained` says it is there. The process's resident
memory is reported with each answer and in GET /api/v1/model.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import pickle
import queue
import signal
import struct
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import IO, Any

import numpy as np

from api.config import ModelSettings
from api.errors import EXIT_LOAD_FAILED, first_line
from api.remote import entrypoints, wire
from api.remote.host.aside import resident_bytes
from api.remote.host.frontends import Frontend
from api.remote.messages import Explain, Explained

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # prctl(2)
MIB = 1024 * 1024
_LENGTH = struct.Struct("<I")


@dataclass(frozen=True)
class Request:
    frontend: Frontend
    message: Explain
    ring: wire.Ring
    pixels: np.ndarray
    model: ModelSettings
    version: str


class Explanations:
    """The explaining process and its admission: `ask` from the engine's main thread, answered from
    a thread of its own."""

    def __init__(self, limit: int, *, retry_after_s: float = 1.0):
        self.limit = limit
        self.retry_after_s = retry_after_s
        self._admitted = 0
        self._lock = threading.Lock()
        self._requests: queue.SimpleQueue[Request | None] = queue.SimpleQueue()
        self._process: Worker | None = None
        self._thread = threading.Thread(target=self._run, name="explain", daemon=True)
        self._thread.start()

    def ask(self, request: Request) -> None:
        with self._lock:
            busy = self._admitted >= self.limit
            if not busy:
                self._admitted += 1
        if busy:
            send_answer(
                request.frontend,
                Explained(
                    request.message.token,
                    503,
                    f"{self._admitted} explanations are in progress (API_MAX_EXPLANATIONS={self.limit}); retry later",
                ),
            )
            return
        self._requests.put(request)

    def close(self) -> None:
        self._requests.put(None)
        self._thread.join(timeout=5)
        if self._process is not None:
            self._process.stop()

    def _run(self) -> None:
        while (request := self._requests.get()) is not None:
            try:
                answer = self._explain(request)
            except Exception as error:  # the explaining process died or refused: this request fails, not the engine
                logger.warning("explain failed: %s", first_line(error))
                if self._process is not None and not self._process.alive():
                    self._process = None
                answer = Explained(request.message.token, 500, f"the explanation failed: {first_line(error)}")
            finally:
                with self._lock:
                    self._admitted -= 1
            send_answer(request.frontend, answer)

    def _explain(self, request: Request) -> Explained:
        worker = self._process
        if worker is None or worker.version != request.version or not worker.alive():
            if worker is not None:
                worker.stop()
            self._process = None
            worker = self._process = Worker.start(request.model, request.version)
        message = request.message
        heatmap, layer, seconds = worker.explain(request.pixels, message.label, bool(message.resize))
        height, width = heatmap.shape
        if message.slot >= request.ring.slots or height * width > request.ring.layout.pixel_bytes:
            raise RuntimeError("the heatmap does not fit the request's ring slot")
        request.ring.heatmap(message.slot, height, width)[...] = heatmap
        return Explained(message.token, 200, None, height, width, layer, seconds, worker.rss_mb())


def send_answer(frontend: Frontend, message: Explained) -> None:
    """Send an explanation's answer to its front-end, under the lock its batch replies are sent under."""
    with frontend.lock:  # the inference threads send replies on this socket too
        if frontend.closed:
            return
        try:
            wire.send(frontend.sock, message)
        except OSError:
            frontend.closed = True


class Worker:
    """The explaining process: settings in, then (pixels, label, resize) -> (H x W uint8 heatmap, layer, seconds)."""

    def __init__(self, process: subprocess.Popen[bytes], version: str):
        self.process = process
        self.version = version

    @property
    def pid(self) -> int:
        return self.process.pid

    @classmethod
    def start(cls, model: ModelSettings, version: str) -> Worker:
        process = subprocess.Popen(
            entrypoints.command(entrypoints.EXPLAIN),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,
            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},  # the CPU only: a GPU's memory is the engine's
        )
        worker = cls(process, version)
        assert process.stdin is not None and process.stdout is not None
        _write(process.stdin, model)
        status, detail = _read(process.stdout)
        if status != "ready":
            worker.stop()
            raise RuntimeError(f"the model could not be loaded for explanations: {detail}")
        logger.info("explanations: model %s loaded in process %d (%.0f MiB)", version, process.pid, worker.rss_mb())
        return worker

    def explain(self, pixels: np.ndarray, label: int, resize: bool) -> tuple[np.ndarray, str, float]:
        assert self.process.stdin is not None and self.process.stdout is not None
        _write(self.process.stdin, (pixels, label, resize))
        status, *answer = _read(self.process.stdout)
        if status != "ok":
            raise RuntimeError(str(answer[0]))
        heatmap, layer, seconds = answer
        return heatmap, layer, seconds

    def alive(self) -> bool:
        return self.process.poll() is None

    def rss_mb(self) -> float:
        return round(resident_bytes(self.process.pid) / MIB, 1) if self.alive() else 0.0

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()
        self.process.wait()
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                pipe.close()


def _write(pipe: IO[bytes], value: Any) -> None:
    data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    pipe.write(_LENGTH.pack(len(data)) + data)
    pipe.flush()


def _read(pipe: IO[bytes]) -> Any:
    head = pipe.read(_LENGTH.size)
    if len(head) < _LENGTH.size:
        raise RuntimeError("the explaining process ended")
    return pickle.loads(pipe.read(_LENGTH.unpack(head)[0]))


def main() -> int:
    """The explaining process: idle priority, one thread, dies with the engine."""
    parent = os.getppid()
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        return EXIT_LOAD_FAILED
    # SCHED_IDLE: the CPU only when nothing else of the host wants it (predictions first, always);
    # where the scheduler refuses it, the lowest niceness
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        os.nice(19)
    logging.basicConfig(level=logging.WARNING, format="explain: %(levelname)s %(name)s: %(message)s")
    import torch

    from api.engine.model.explain import load_explainer

    torch.set_num_threads(1)
    stdin = sys.stdin.buffer
    stdout = os.fdopen(os.dup(1), "wb")  # the answers' pipe; what libraries print goes to stderr instead
    os.dup2(2, 1)
    model = _read(stdin)
    try:
        explainer = load_explainer(model)
    except Exception as error:  # whatever the checkpoint did: the reason, not a traceback
        _write(stdout, ("failed", first_line(error)))
        return EXIT_LOAD_FAILED
    _write(stdout, ("ready", None))
    while True:
        try:
            pixels, label, resize = _read(stdin)
        except RuntimeError:
            return 0  # the engine closed the pipe
        try:
            if resize:
                from PIL import Image

                pixels = explainer.recipe.pixels(Image.fromarray(pixels))
            heatmap = explainer.explain(pixels, label)
            _write(stdout, ("ok", heatmap.gray(), heatmap.layer, heatmap.seconds))
        except Exception as error:
            _write(stdout, ("failed", first_line(error)))


if __name__ == "__main__":
    sys.exit(main())
