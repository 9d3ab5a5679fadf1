"""The one-pass multipart reader against Starlette's `request.form()` (the reader it replaced), on
bodies httpx encodes as clients send them, fed in chunks of every size, and its refusals."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest
from starlette.datastructures import UploadFile
from starlette.requests import Request

from api.http.multipart import MultipartError, Part, read_form


def _encoded(**kwargs: object) -> tuple[bytes, str]:
    request = httpx.Request("POST", "http://127.0.0.1/", **kwargs)  # type: ignore[arg-type]
    return request.read(), request.headers["content-type"]


def _request(body: bytes, content_type: str, chunk: int) -> Request:
    pieces: Iterator[bytes] = iter([body[i : i + chunk] for i in range(0, len(body), chunk)] or [b""])

    async def receive() -> dict[str, object]:
        piece = next(pieces, None)
        return {"type": "http.request", "body": piece or b"", "more_body": piece is not None}

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/",
        "query_string": b"",
        "headers": [(b"content-type", content_type.encode())],
    }
    return Request(scope, receive)  # type: ignore[arg-type]


def _read(body: bytes, content_type: str, chunk: int = 65536, **limits: int) -> list[Part]:
    limits.setdefault("max_files", 1000)
    limits.setdefault("max_fields", 1000)
    return asyncio.run(read_form(_request(body, content_type, chunk), **limits))


async def _starlette(body: bytes, content_type: str) -> list[tuple[str, str | None, bytes]]:
    form = await _request(body, content_type, 65536).form()
    parts = []
    for name, value in form.multi_items():
        if isinstance(value, UploadFile):
            parts.append((name, value.filename, await value.read()))
        else:
            parts.append((name, None, value.encode()))
    await form.close()
    return parts


@pytest.mark.parametrize("chunk", [1, 7, 4096, 65536])
def test_parts_are_starlettes_in_any_chunking(chelsea_jpeg: bytes, chunk: int) -> None:
    body, content_type = _encoded(
        files=[
            ("file", ("chelsea.jpg", chelsea_jpeg, "image/jpeg")),
            ("file", ("café.jpg", b"\r\n--x\r\n", "image/jpeg")),
        ],
        data={"note": "a plain field", "empty": ""},
    )
    parts = _read(body, content_type, chunk)
    assert [(p.name, p.filename, p.data) for p in parts] == asyncio.run(_starlette(body, content_type))
    assert parts[-2].data == chelsea_jpeg and parts[-1].filename == "café.jpg"


@pytest.mark.parametrize(
    ("kwargs", "limits", "reason"),
    [
        ({"files": [("file", ("a", b"1")), ("file", ("b", b"2"))]}, {"max_files": 1}, "Too many files. Maximum number of files is 1."),
        ({"data": {f"f{i}": "x" for i in range(3)}, "files": {"file": ("a", b"1")}}, {"max_fields": 2}, "Too many fields. Maximum number of fields is 2."),
        ({"data": {"big": "x" * 2048}, "files": {"file": ("a", b"1")}}, {"max_part_size": 1024}, "Part exceeded maximum size of 1KB."),
    ],
)  # fmt: skip
def test_limits_refuse_with_starlettes_reasons(kwargs: dict, limits: dict[str, int], reason: str) -> None:
    body, content_type = _encoded(**kwargs)
    with pytest.raises(MultipartError) as refused:
        _read(body, content_type, **limits)
    assert str(refused.value) == reason
    _read(body, content_type)  # within the defaults the same body is read


def test_a_file_part_is_not_held_to_the_field_size() -> None:
    body, content_type = _encoded(files={"file": ("a.jpg", bytes(4096))})
    assert _read(body, content_type, max_part_size=1024)[0].data == bytes(4096)


@pytest.mark.parametrize(
    ("body", "content_type", "reason"),
    [
        (b"--x\r\nbroken", "multipart/form-data", "Missing boundary in multipart."),
        (b"--x\r\nContent-Disposition: form-data\r\n\r\nv\r\n--x--\r\n", "multipart/form-data; boundary=x", 'The Content-Disposition header field "name" must be provided.'),
        (b"--x\r\nContent-Disposition: form-data; name=\"file\"; filename=\"" + b"c" * 5000 + b"\"\r\n\r\nv\r\n--x--\r\n", "multipart/form-data; boundary=x", "Maximum header size exceeded"),
        (b"--y\r\n\r\n", "multipart/form-data; boundary=x", "Expected boundary character"),
    ],
)  # fmt: skip
def test_malformed_bodies_say_why(body: bytes, content_type: str, reason: str) -> None:
    with pytest.raises(MultipartError) as refused:
        _read(body, content_type, chunk=3)
    assert str(refused.value).startswith(reason), refused.value
