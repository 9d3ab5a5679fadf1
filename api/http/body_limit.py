"""Refuse oversized request bodies while reading them, never after buffering them.

A declared Content-Length over the limit is answered 413 before a byte of the body is read; a
body that streams past the limit (chunked, or longer than declared) is cut off at the limit.
Starlette's own `RequestBodyLimitMiddleware` does the same but answers in plain text; this
service's contract is a JSON error body for every refusal, so the check lives here.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import PayloadTooLarge


class BodyLimitMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        limit_for_path: Callable[[str], int | None],
        error_body: Callable[[str, str, str], dict[str, Any]],
    ):
        self.app = app
        self.limit_for_path = limit_for_path
        self.error_body = error_body  # (path, code, message) -> the JSON error as that route answers it

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self.limit_for_path(scope["path"]) if scope["type"] == "http" else None
        if limit is None:
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            message = f"request body of {int(declared)} bytes exceeds the limit of {limit} bytes"
            await _refuse(send, self.error_body(scope["path"], PayloadTooLarge.code, message))
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # Raised inside the route's body read, so the app's error handler answers it.
                    raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
            return message

        await self.app(scope, limited_receive, send)


async def _refuse(send: Send, error: dict[str, Any]) -> None:
    body = json.dumps(error).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),  # the unread body makes the connection unusable
    ]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})
