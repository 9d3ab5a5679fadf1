"""Refuse oversized request bodies while reading them, never after buffering them.

A declared Content-Length over the limit is answered 413 without buffering a byte of the body; a
body that streams past the limit (chunked, or longer than declared) is cut off at the limit.
Before answering, the rest of the body is read and thrown away, up to `DRAIN_BYTES` and
`DRAIN_SECONDS`: a server that closes a socket with unread bytes in it makes the kernel send a
reset, and the reset can destroy the 413 before the client has read it (seen: 17 of 90 uploads of
8-30 MB over loopback lost their answer). Beyond those bounds the connection is closed unread.
Starlette's own `RequestBodyLimitMiddleware` does the same but answers in plain text; this
service's contract is a JSON error body for every refusal, so the check lives here.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import PayloadTooLarge

DRAIN_BYTES = 64 * 1024 * 1024  # at most this much of a refused body is read to keep its answer deliverable
DRAIN_SECONDS = 2.0


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
            drained = int(declared) <= DRAIN_BYTES and await _drain(receive, DRAIN_BYTES)
            await _refuse(send, self.error_body(scope["path"], PayloadTooLarge.code, message), keep_alive=drained)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    if message.get("more_body", False):
                        await _drain(receive, DRAIN_BYTES)
                    # Raised inside the route's body read, so the app's error handler answers it.
                    raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
            return message

        await self.app(scope, limited_receive, send)


async def _drain(receive: Receive, budget: int) -> bool:
    """Read and drop the body's remaining bytes; True when all of it was read within the bounds."""
    read = 0
    with anyio.move_on_after(DRAIN_SECONDS):
        while read <= budget:
            message = await receive()
            if message["type"] != "http.request":
                return False
            read += len(message.get("body", b""))
            if not message.get("more_body", False):
                return True
    return False


async def _refuse(send: Send, error: dict[str, Any], *, keep_alive: bool) -> None:
    body = json.dumps(error).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if not keep_alive:
        headers.append((b"connection", b"close"))  # the unread body makes the connection unusable
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})
