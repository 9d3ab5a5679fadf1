"""Logging set-up for the service process (tests leave logging alone)."""

from __future__ import annotations

import logging
import logging.handlers
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_FILE = "api.log"


def configure_logging(level: str, log_dir: Path | None = None) -> None:
    """One-line records on stderr (and in `log_dir/api.log`, rotated, when set).

    Uvicorn configures its own `uvicorn.*` loggers; this sets the root handlers and levels that our
    `api.*` loggers and the libraries below them use.
    """
    logging.basicConfig(level=level, format=FORMAT)
    root = logging.getLogger()
    root.setLevel(level)
    logging.getLogger("api").setLevel(level)
    if log_dir is not None:
        path = log_dir / LOG_FILE
        if not any(getattr(h, "baseFilename", None) == str(path.resolve()) for h in root.handlers):
            log_dir.mkdir(parents=True, exist_ok=True)
            handler = logging.handlers.RotatingFileHandler(path, maxBytes=10 * 1024**2, backupCount=5)
            handler.setFormatter(logging.Formatter(FORMAT))
            root.addHandler(handler)
