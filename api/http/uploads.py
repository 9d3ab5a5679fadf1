"""Read the image(s) out of a request: multipart `file`, a raw image body, or JSON with base64.

The declared Content-Type only selects how to *unwrap* the body; whether the bytes are an image is
decided later, from the bytes themselves (`api.engine.images.decode.decode_image`).
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass

from starlette.requests import Request

from api.errors import InvalidBase64, InvalidJson, InvalidMultipart, MissingFile, PayloadTooLarge
from api.http.multipart import MultipartError, read_form

FIELD = "file"


@dataclass(frozen=True)
class UploadedFile:
    filename: str | None
    data: bytes


async def read_uploads(request: Request, *, max_bytes: int, max_files: int) -> list[UploadedFile]:
    """Every upload in the request, each at most `max_bytes`; at most `max_files` of them."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        uploads = await _read_multipart(request, max_files=max_files)
    elif content_type == "application/json":
        uploads = [_read_base64(await request.body(), max_bytes=max_bytes)]
    elif content_type == "application/x-www-form-urlencoded":
        raise MissingFile(
            f"send the image as multipart/form-data with a file field named {FIELD!r} "
            f'(curl -F "{FIELD}=@cat.jpg"), as a raw image body, or as JSON with base64'
        )
    else:
        body = await request.body()
        if not body:
            raise MissingFile(
                f"no image in the request: send multipart/form-data with a file field named {FIELD!r} "
                f'(curl -F "{FIELD}=@cat.jpg"), a raw image body, or JSON {{"image": "<base64>"}}'
            )
        uploads = [UploadedFile(filename=None, data=body)]
    for upload in uploads:
        if len(upload.data) > max_bytes:
            raise PayloadTooLarge(
                f"{_name(upload)} is {len(upload.data)} bytes; the limit is {max_bytes} (API_MAX_UPLOAD_MB)"
            )
    return uploads


def _name(upload: UploadedFile) -> str:
    return repr(upload.filename[:100]) if upload.filename else "the image"


async def _read_multipart(request: Request, *, max_files: int) -> list[UploadedFile]:
    try:
        parts = await read_form(request, max_files=max_files, max_fields=64)
    except MultipartError as error:
        raise InvalidMultipart(f"malformed multipart body: {_reason(error)}") from None
    values = [part for part in parts if part.name == FIELD]
    files = [UploadedFile(filename=part.filename, data=part.data) for part in values if part.filename is not None]
    if not files:
        if values:
            raise MissingFile(f'field {FIELD!r} must be a file upload (curl -F "{FIELD}=@cat.jpg")')
        others = sorted({part.name for part in parts})
        hint = f"; got fields {others[:10]}" if others else ""
        raise MissingFile(f'no multipart file field named {FIELD!r}{hint} (curl -F "{FIELD}=@cat.jpg")')
    return files


def _reason(error: MultipartError) -> str:
    """Why the body is malformed, as the parser said it (python-multipart's reason, e.g. "Maximum
    header size exceeded", which a very long filename hits), with the fix where it is not obvious."""
    reason = str(error).strip().rstrip(".")
    if "header size" in reason.lower():
        reason += " (a part's headers, the filename included, must stay under 4 KiB)"
    return reason or type(error).__name__


def _read_base64(body: bytes, *, max_bytes: int) -> UploadedFile:
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise InvalidJson("request body is not valid JSON") from None
    text = payload.get("image") if isinstance(payload, dict) else None
    if not isinstance(text, str) or not text:
        raise MissingFile('JSON body needs {"image": "<base64 image bytes>"}')
    if text.startswith("data:"):
        text = text.partition(",")[2]
    if len(text) > (max_bytes * 4) // 3 + 8:
        raise PayloadTooLarge(f"the image is larger than the limit of {max_bytes} bytes (API_MAX_UPLOAD_MB)")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidBase64("the 'image' field is not valid base64") from None
    filename = payload.get("filename")
    return UploadedFile(filename=filename if isinstance(filename, str) else None, data=data)
