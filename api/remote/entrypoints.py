"""The processes this package starts, named in one place (tests/unit/test_layers.py checks each).

ENGINE   the engine process, started by a front-end when none serves its group
PREPARE  a swap's new model, built and checked in a process of its own before the engine loads it
EXPLAIN  Grad-CAM of the served model, beside the engine, started on the first explain=true
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from api.config import BatchingSettings, ModelSettings, Settings

ENGINE = "api.remote.host.main"
PREPARE = "api.remote.host.prepare"
EXPLAIN = "api.remote.host.explainer"
MODULES = (ENGINE, PREPARE, EXPLAIN)


@dataclass(frozen=True)
class EngineConfig:
    """What an engine process is started with (pickled to its stdin)."""

    model: ModelSettings
    batching: BatchingSettings
    linger_s: float
    log_level: str
    log_dir: Path | None
    log_format: str
    model_repository: Path | None  # where swaps may load from (None: the configured checkpoint's folder)
    load_timeout_s: float  # a swap's load is abandoned after this (API_MODEL_LOAD_TIMEOUT_S)
    # the model swapped in last (None: the configured one); model.checkpoint_path stays the configured one
    swapped_in: Path | None = None

    @classmethod
    def from_settings(cls, settings: Settings, *, linger_s: float, **overrides: Any) -> EngineConfig:
        """The engine process's configuration from the service's settings (`overrides` by field name)."""
        config = cls(
            settings.model_group,
            dataclasses.replace(settings.batching_group, workers=1),  # the engine has the CPUs to itself
            linger_s,
            settings.log_level,
            settings.log_dir,
            settings.log_format,
            settings.model_repository,
            settings.model_load_timeout_s,
        )
        return dataclasses.replace(config, **overrides)


def command(module: str, *args: str) -> list[str]:
    """`python -m module args...` with this interpreter."""
    return [sys.executable, "-m", module, *args]
