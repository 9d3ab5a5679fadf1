"""Request ids and one structured access-log line per request.

`X-Request-ID` is honoured when the client sends a sane one (else generated) and echoed on every
response, errors included, so a user's report can be matched to the log line. Each request is
logged once with structured fields (id, method, path, status, latency, batch size), which the JSON
log format writes as one object per line; health and metrics probes at DEBUG. An unhandled error is
logged here once, at ERROR with the request id, and answered as a generic 500.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.datastructures import MutableHeaders
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import InternalError
from api.logs import REQUEST_ID

logger = logging.getLogger("api.access")
errors = logging.getLogger(__name__)
_INTERNAL_ERROR = JSONResponse(
    {"error": {"code": InternalError.code, "message": "internal server error"}}, InternalError.status
)

_VALID_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_QUIET = ("/health", "/metrics")


def request_id_from(scope: Scope) -> str:
    for name, value in scope.get("headers", []):
        if name == b"x-request-id":
            candidate = value.decode("latin-1")
            if _VALID_ID.match(candidate):
                return candidate
    return uuid.uuid4().hex


class RequestLogMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_from(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        token = REQUEST_ID.set(request_id)  # every record written while serving it carries the id
        started = time.perf_counter()
        status = 0  # until the answer starts

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message).append("X-Request-ID", request_id)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            # A fault of ours: one ERROR record (traceback, request id), a generic 500 without details.
            # Handled here, inside the request's context, so the server does not log it a second time.
            errors.exception(
                "unhandled error on %s %s", scope.get("method"), scope.get("path"), extra={"request_id": request_id}
            )
            if status:
                raise  # half-answered: only dropping the connection is left
            await _INTERNAL_ERROR(scope, receive, send_with_id)
        finally:
            path = scope.get("path", "")
            fields = {
                "event": "request",
                "request_id": request_id,
                "method": scope.get("method"),
                "path": path,
                "status": status,
                "latency_ms": round((time.perf_counter() - started) * 1000, 2),
                "client": (scope.get("client") or ("", 0))[0],
            }
            batch_size = scope["state"].get("batch_size")  # set by the predict routes
            if batch_size is not None:
                fields["batch_size"] = batch_size
            level = logging.DEBUG if path.startswith(_QUIET) else logging.INFO
            message = f"{fields['method']} {path} {status} {fields['latency_ms']}ms id={request_id}"
            logger.log(level, message, extra=fields)
            REQUEST_ID.reset(token)
