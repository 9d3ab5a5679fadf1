"""`python -m api.remote.host.prepare THREADS`: a swap's new model, built and checked in a process of its own.

A swap's first step (api/remote/host/swapper.py, run by api/remote/host/aside.py). Whatever the file
does to the loader (a huge or endless read, a decompression bomb, a hang) happens here, where the
engine can kill it at a deadline or a memory ceiling, never in the engine. On a CPU it is also where
the model is converted to OpenVINO and every candidate runtime and precision measured (INT8
quantized, API_EVAL_DIR's images judged: seconds to a minute of work that holds Python's lock in long
stretches; in the engine process it would stall the served model's answers): the engine's own load
then reads the converted model and the choice from the model cache. The engine's first load comes
here too when the cache has no measurement for its model (api/remote/host/host.py). The
ModelSettings arrive pickled on stdin; a failed load prints why as its last line and exits
EXIT_LOAD_FAILED.

`prepare_beside` is the engine's half: the room check (from the file's size, before a byte is
read), then this process under the swap's deadline and a memory ceiling.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import pickle
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING

from api.config import ModelSettings
from api.engine.model.files.folds import weights_bytes
from api.errors import EXIT_LOAD_FAILED, ModelLoadError
from api.remote import entrypoints
from api.remote.host.aside import run_aside
from api.remote.host.rules import HEADROOM_BYTES, PREPARE_BYTES, device_room, host_room

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # prctl(2)


def prepare_beside(
    model: ModelSettings, device: torch.device, *, threads: int, deadline: float, cancel: threading.Event
) -> None:
    """Build `model` in a process of its own, if both models fit; ModelLoadError or AsideFailed if not.

    The process may hold the room a second model needs, twice over at most (never more than is
    free); on a GPU host it checks the model on the CPU and never touches the GPU."""
    assert model.checkpoint_path is not None
    weights = weights_bytes(model.checkpoint_path)
    room = host_room(weights, extra=PREPARE_BYTES)
    rooms = [room]
    gpu = device.type == "cuda"
    if gpu:
        import torch

        rooms.append(device_room(weights, torch.cuda.mem_get_info(device)[0]))
    for needed in rooms:
        if not needed.fits:
            raise ModelLoadError(needed.refusal())
    checked = (
        dataclasses.replace(
            model, device="cpu", runtime="torch", precision="fp32", eval_dir=None, compile=False, cuda_graphs=False
        )
        if gpu
        else model
    )
    finished = run_aside(
        entrypoints.command(entrypoints.PREPARE, str(threads)),
        pickle.dumps(checked),
        timeout_s=max(deadline - time.monotonic(), 0.0),
        memory_limit=max(room.needed, min(2 * room.needed, room.free - HEADROOM_BYTES)),
        cancel=cancel,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""} if gpu else None,
    )
    logger.info(
        "new model prepared in a process of its own in %.2fs (peak %.0f MiB)",
        finished.seconds,
        finished.peak_bytes / (1 << 20),
    )


def main(argv: list[str]) -> int:
    _die_with_the_engine()
    os.nice(10)  # the served model's answers come first; this gets the CPU they leave
    settings = pickle.load(sys.stdin.buffer)
    threads = int(argv[0])
    logging.basicConfig(level=logging.WARNING, format="prepare: %(levelname)s %(name)s: %(message)s")

    import torch

    from api.engine.model.loader import load_classifier
    from api.errors import EXIT_OK, StartupError, first_line

    torch.set_num_threads(threads)
    try:
        load_classifier(settings, threads=threads)
    except StartupError as error:
        print(first_line(error), flush=True)
        return EXIT_LOAD_FAILED
    except Exception as error:  # whatever the file made the loader do: the reason, not a traceback
        print(f"unexpected {type(error).__name__} while loading it: {first_line(error)}", flush=True)
        return EXIT_LOAD_FAILED
    return EXIT_OK


def _die_with_the_engine() -> None:
    """An engine that dies (killed, say) takes this process with it, never leaving it to hold memory."""
    parent = os.getppid()
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before the line above
        os._exit(EXIT_LOAD_FAILED)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
