"""Logging set-up for the service process (tests leave logging alone)."""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str) -> None:
    """Plain one-line records on stderr for our loggers and the libraries below them.

    Uvicorn configures its own `uvicorn.*` loggers; this only sets the root handler and levels.
    """
    logging.basicConfig(level=level, format=FORMAT)
    logging.getLogger().setLevel(level)
    logging.getLogger("api").setLevel(level)
