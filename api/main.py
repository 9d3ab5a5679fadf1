"""`api.main:app`: what uvicorn and Gunicorn import, built on first access from the environment.

The app itself is assembled by `api.http.app.create_app`; tests and runners call that with settings
(and a load policy) of their own.
"""

from __future__ import annotations

import sys
from typing import Any

from fastapi import FastAPI

from api.config import ConfigError, get_settings
from api.errors import EXIT_BAD_CONFIG, EXIT_LOAD_FAILED
from api.http.app import LoadPolicy, create_app
from api.logs import configure_logging

__all__ = ["EXIT_BAD_CONFIG", "EXIT_LOAD_FAILED", "LoadPolicy", "app_from_environment", "create_app"]


def app_from_environment() -> FastAPI:
    """The app for `uvicorn api.main:app`: settings from the environment, one line and exit if invalid."""
    try:
        settings = get_settings()
    except ConfigError as error:
        sys.stderr.write(f"configuration error: {error}\n")
        raise SystemExit(EXIT_BAD_CONFIG) from None
    configure_logging(settings.log_level, settings.log_dir, settings.log_format)
    return create_app(settings)


_app: FastAPI | None = None


def __getattr__(name: str) -> Any:
    # `api.main:app` is built on first access, so importing this module (tests, the CLI, tools)
    # neither reads the environment nor fails on settings meant for another process.
    global _app
    if name == "app":
        if _app is None:
            _app = app_from_environment()
        return _app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
