"""`python -m api.remote.host.prepare THREADS`: a swap's new model, built and checked in a process of its own.

A swap's first step (api/remote/host/swapper.py, run by api/remote/host/aside.py). Whatever the file
does to the loader (a huge or endless read, a decompression bomb, a hang) happens here, where the
engine can kill it at a deadline or a memory ceiling, never in the engine. On a CPU it is also where
the model is converted to OpenVINO (seconds of work that holds Python's lock in long stretches; in
the engine process it would stall the served model's answers): the engine's own load then reads
the converted model from the model cache. The ModelSettings arrive pickled on stdin; a failed load
prints why as its last line and exits EXIT_LOAD_FAILED.
"""

from __future__ import annotations

import logging
import os
import pickle
import sys


def main(argv: list[str]) -> int:
    os.nice(10)  # the served model's answers come first; this gets the CPU they leave
    settings = pickle.load(sys.stdin.buffer)
    threads = int(argv[0])
    logging.basicConfig(level=logging.WARNING, format="prepare: %(levelname)s %(name)s: %(message)s")

    import torch

    from api.engine.loader import load_classifier
    from api.errors import EXIT_LOAD_FAILED, StartupError, first_line

    torch.set_num_threads(threads)
    try:
        load_classifier(settings, threads=threads)
    except StartupError as error:
        print(first_line(error), flush=True)
        return EXIT_LOAD_FAILED
    except Exception as error:  # whatever the file made the loader do: the reason, not a traceback
        print(f"unexpected {type(error).__name__} while loading it: {first_line(error)}", flush=True)
        return EXIT_LOAD_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
