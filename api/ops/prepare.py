"""`python -m api.ops.prepare THREADS`: build a model once in a process of its own, so that what it
leaves in the model cache (the OpenVINO conversion, the runtime choice) is there for the engine.

A model swap's first step on a CPU (api/engine/host.py): converting a model to OpenVINO is seconds
of work that holds Python's lock in long stretches; done in the engine process it would stall the
served model's answers meanwhile. Done here, the engine's own load reads the converted model from
the cache. The ModelSettings arrive pickled on stdin; a failed load exits 3, and the engine's own
load then says why.
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
    from api.errors import StartupError

    torch.set_num_threads(threads)
    try:
        load_classifier(settings, threads=threads)
    except StartupError:
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
