"""The processes this package starts, named in one place (tests/unit/test_layers.py checks each).

ENGINE   the engine process, started by a front-end when none serves its group
PREPARE  a swap's new model, built and checked in a process of its own before the engine loads it
"""

from __future__ import annotations

import sys

ENGINE = "api.remote.host.main"
PREPARE = "api.remote.host.prepare"
MODULES = (ENGINE, PREPARE)


def command(module: str, *args: str) -> list[str]:
    """`python -m module args...` with this interpreter."""
    return [sys.executable, "-m", module, *args]
