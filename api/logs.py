"""Logging set-up for the service process (tests leave logging alone).

Records go to stdout and, with a log folder, to `<dir>/api.log` (rotated). In the default `json`
format each record is one JSON object per line: time, level, logger, message, plus the structured
fields a record carries (`extra=`), such as the access log's request id, status and latency.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# The request being served, for every record written while serving it (set by api.http.requestlog; the
# decode pool runs each job in a copy of the request's context).
REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_FILE = "api.log"
_ROTATE_BYTES = 10 * 1024**2
_ROTATE_KEEP = 5
# Attributes every LogRecord has; anything else on a record came from `extra=` and is a field.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName", "color_message"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message, extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,  # which worker, under Gunicorn
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class RecordContext(logging.Filter):
    """On every handler: the request id of the request being served, and decoder messages demoted.

    What Pillow's plugins log or warn about an upload (a TIFF with impossible tags, corrupt EXIF)
    is about the client's file, which is answered 400: it is written at DEBUG, never at ERROR.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None and (request_id := REQUEST_ID.get()) is not None:
            record.request_id = request_id
        if _from_decoder(record):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger().isEnabledFor(logging.DEBUG)
        return True


def _from_decoder(record: logging.LogRecord) -> bool:
    if record.name == "PIL" or record.name.startswith("PIL."):
        return True
    # warnings.warn() from Pillow's modules, through logging.captureWarnings
    return record.name == "py.warnings" and f"{os.sep}PIL{os.sep}" in str(
        record.args[0] if isinstance(record.args, tuple) and record.args else record.msg
    )


def formatter(log_format: str) -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)


def configure_logging(level: str, log_dir: Path | None = None, log_format: str = "json") -> None:
    """Root handlers for stdout (and `log_dir/api.log`); our `api.*` loggers and uvicorn's propagate here.

    The service process owns its logging: whatever root handlers it inherited (a Gunicorn worker
    inherits the master's, from `api.gunicorn_conf`) are replaced, so each record is written once.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        if getattr(handler, "_cat_breeds_api", False):  # ours from before (a reload): its file too
            handler.close()
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(
            logging.handlers.RotatingFileHandler(log_dir / LOG_FILE, maxBytes=_ROTATE_BYTES, backupCount=_ROTATE_KEEP)
        )
    for handler in handlers:
        handler.setFormatter(formatter(log_format))
        handler.addFilter(RecordContext())
        handler._cat_breeds_api = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("api").setLevel(level)
    # Pillow's DEBUG tracing of every tag it parses would drown a DEBUG log; its warnings stay (demoted).
    logging.getLogger("PIL").setLevel(max(logging.WARNING, logging.getLevelName(level)))
    logging.captureWarnings(True)  # warnings.warn() becomes a record, not a raw line on stderr
    # uvicorn's loggers: through the handlers above; its access log is ours (api.access), not twice.
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True
