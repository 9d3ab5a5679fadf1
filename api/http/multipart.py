"""A multipart/form-data body read in one pass: python-multipart's parser, the parts kept as bytes.

Starlette's `request.form()` runs the same parser but writes each file part into a spooled temporary
file and answers `UploadFile`s that are then read back: for a 210 KB photo that is 0.45 ms of a
front-end's event loop, where the parser alone takes 0.08 (docs/performance.md). Every body here is
bounded before it is read (api/http/body_limit.py) and its image is wanted in memory, so the parts
are kept as bytes. The limits and the reasons of a refusal are Starlette's: at most `max_files` file
parts and `max_fields` other fields, a field's value at most `max_part_size`, python-multipart's own
limits on a part's headers, and its reason for a body it cannot parse.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

MAX_PART_SIZE = 1024 * 1024  # a field that is not a file (as Starlette's default)


class MultipartError(ValueError):
    """A body that is not the multipart it says it is; the message is the reason."""


@dataclass
class Part:
    """One part of the form: its field name, its filename (None for a plain field) and its bytes."""

    name: str
    filename: str | None
    data: bytes


@dataclass
class _Reading:
    max_files: int
    max_fields: int
    max_part_size: int
    charset: str
    parts: list[Part] = field(default_factory=list)
    files: int = 0
    fields: int = 0
    header_name: bytes = b""
    header_value: bytes = b""
    disposition: bytes = b""
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0
    current: Part | None = None

    def on_part_begin(self) -> None:
        self.disposition, self.chunks, self.size, self.current = b"", [], 0, None

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def on_header_end(self) -> None:
        if self.header_name.lower() == b"content-disposition":
            self.disposition = self.header_value
        self.header_name, self.header_value = b"", b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self.disposition)
        if b"name" not in options:
            raise MultipartError('The Content-Disposition header field "name" must be provided.')
        filename = None
        if b"filename" in options:
            self.files += 1
            if self.files > self.max_files:
                raise MultipartError(f"Too many files. Maximum number of files is {self.max_files}.")
            filename = self._text(options[b"filename"])
        else:
            self.fields += 1
            if self.fields > self.max_fields:
                raise MultipartError(f"Too many fields. Maximum number of fields is {self.max_fields}.")
        self.current = Part(self._text(options[b"name"]), filename, b"")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        self.size += end - start
        if self.current is not None and self.current.filename is None and self.size > self.max_part_size:
            raise MultipartError(f"Part exceeded maximum size of {self.max_part_size // 1024}KB.")
        self.chunks.append(data[start:end])

    def on_part_end(self) -> None:
        if self.current is not None:
            self.current.data = self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)
            self.parts.append(self.current)
        self.chunks, self.current = [], None

    def _text(self, value: bytes) -> str:
        try:
            return value.decode(self.charset)
        except (UnicodeDecodeError, LookupError):
            return value.decode("latin-1")


async def read_form(
    request: Request, *, max_files: int, max_fields: int, max_part_size: int = MAX_PART_SIZE
) -> list[Part]:
    """Every part of the request's multipart body, in order; MultipartError with the reason for a
    malformed one. What the body's stream raises (a body over its limit) passes through."""
    _, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if not boundary:
        raise MultipartError("Missing boundary in multipart.")
    charset = params.get(b"charset", b"utf-8").decode("latin-1")
    try:
        charset = codecs.lookup(charset).name
    except LookupError:
        charset = "latin-1"
    reading = _Reading(max_files, max_fields, max_part_size, charset)
    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": reading.on_part_begin,
            "on_header_field": reading.on_header_field,
            "on_header_value": reading.on_header_value,
            "on_header_end": reading.on_header_end,
            "on_headers_finished": reading.on_headers_finished,
            "on_part_data": reading.on_part_data,
            "on_part_end": reading.on_part_end,
        },
    )
    async for chunk in request.stream():
        _write(parser, chunk)
    _write(parser, None)
    return reading.parts


def _write(parser: MultipartParser, chunk: bytes | None) -> None:
    """A chunk into the parser (None: the end), its refusal as a MultipartError with its reason."""
    try:
        if chunk is None:
            parser.finalize()
        elif chunk:
            parser.write(chunk)
    except MultipartError:
        raise
    except Exception as error:  # python-multipart's errors, each with its reason
        raise MultipartError(str(error) or type(error).__name__) from None
