"""The Open Inference Protocol's (KServe v2) infer body, read and written: JSON, and the binary
tensor data extension Triton's clients use by default.

A request body is a JSON header, then (when `Inference-Header-Content-Length` says where the JSON
ends) each binary input's raw bytes in input order, `parameters.binary_data_size` each. A BYTES
tensor's elements are each a 4-byte little-endian length and the bytes; in JSON they are strings
(base64 here: an image file is not text). Answers mirror it: binary outputs follow the JSON header
when the request asked for them (`binary_data` per output, `binary_data_output` for all).

Two inputs, one per served model name: `image` (BYTES, an encoded image file per element) and
`pixels` (UINT8 [N, H, W, 3], 8-bit RGB a client decoded itself; binary, or JSON integers).

Pure functions of bytes: the routes (api/http/routes/v2.py) add the model, limits and errors' HTTP
shape. Malformed requests raise `InvalidRequest` (400) naming what and where.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from api.engine.serving.pipeline import Upload
from api.errors import InvalidRequest, PayloadTooLarge

HEADER_LENGTH = "inference-header-content-length"
OUTPUT = "probabilities"


@dataclass(frozen=True)
class InputSpec:
    """A model's one input, as its metadata and config describe it."""

    name: str
    datatype: str
    shape: list[int]  # -1: any size
    config_type: str  # Triton's ModelConfig data_type
    what: str  # for error messages


IMAGE = InputSpec("image", "BYTES", [-1], "TYPE_STRING", "one encoded image file per element")
PIXELS = InputSpec("pixels", "UINT8", [-1, -1, -1, 3], "TYPE_UINT8", "8-bit RGB pixels, shape [N, H, W, 3]")


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool
    class_count: int  # > 0: the classification extension ("score:index:label" strings, best first)


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    images: list[Upload]  # encoded files (IMAGE) or (H, W, 3) uint8 arrays, views of the body (PIXELS)
    outputs: list[RequestedOutput]


@dataclass(frozen=True)
class OutputTensor:
    name: str
    datatype: str  # FP32 or BYTES
    shape: list[int]
    data: np.ndarray | list[bytes]
    binary: bool


def parse_infer(body: bytes, header_length: str | None, *, max_images: int, spec: InputSpec = IMAGE) -> InferRequest:
    """An infer request's images (for the model whose input is `spec`) and wanted outputs; 400
    (InvalidRequest) for anything malformed, 413 (PayloadTooLarge) for more than `max_images`."""
    binary = memoryview(b"")  # the body's binary part, not copied: pixels stay views of it
    if header_length is not None:
        if not header_length.strip().isdigit() or int(header_length) > len(body):
            raise InvalidRequest(
                f"Inference-Header-Content-Length {header_length!r} is not a length within the {len(body)}-byte body"
            )
        if int(header_length) == 0:
            raise InvalidRequest("raw binary requests (Inference-Header-Content-Length: 0) are not supported")
        header_bytes, binary = body[: int(header_length)], memoryview(body)[int(header_length) :]
    else:
        header_bytes = body
    try:
        header = json.loads(header_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        hint = "" if header_length is not None else " (binary data needs the Inference-Header-Content-Length header)"
        raise InvalidRequest(f"the request is not JSON: {error}{hint}") from None
    if not isinstance(header, dict):
        raise InvalidRequest("the request must be a JSON object with 'inputs'")
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise InvalidRequest(f"the request must have exactly one input, {spec.name!r} ({spec.datatype}, {spec.what})")
    tensor = inputs[0]
    if tensor.get("name") != spec.name:
        raise InvalidRequest(
            f"unknown input {tensor.get('name')!r}; this model takes one input, {spec.name!r} ({spec.datatype})"
        )
    datatype = tensor.get("datatype")
    if datatype != spec.datatype:
        raise InvalidRequest(f"input {spec.name!r} must be {spec.datatype} ({spec.what}), not {datatype!r}")
    read = _pixels if spec is PIXELS else _images
    images, used = read(tensor, binary, max_images)
    if used != len(binary):
        raise InvalidRequest(f"{len(binary) - used} bytes of binary data follow the inputs' binary_data_size")
    request_id = header.get("id")
    return InferRequest(
        str(request_id) if request_id is not None else None,
        images,
        _outputs(header.get("outputs"), _flag(_parameters(header), "binary_data_output", "the request")),
    )


def _parameters(entry: dict[str, Any]) -> dict[str, Any]:
    parameters = entry.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidRequest("'parameters' must be a JSON object")
    return parameters


def _flag(parameters: dict[str, Any], name: str, where: str) -> bool:
    value = parameters.get(name, False)
    if not isinstance(value, bool):
        raise InvalidRequest(f"{where}: parameter {name!r} must be true or false, not {value!r}")
    return value


def _images(tensor: dict[str, Any], binary: memoryview, max_images: int) -> tuple[list[Upload], int]:
    shape = tensor.get("shape")
    valid = (
        isinstance(shape, list)
        and len(shape) in (1, 2)
        and all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
        and shape[0] >= 1
        and shape[1:] in ([], [1])
    )
    if not valid:
        raise InvalidRequest(f"input {IMAGE.name!r} must have shape [N] or [N, 1] with N >= 1, not {shape!r}")
    assert isinstance(shape, list)
    count = _at_most(shape[0], max_images)
    parameters = _parameters(tensor)
    size = _binary_size(tensor, IMAGE, binary)
    if size is not None:
        images: list[Upload] = list(_length_prefixed(binary[:size]))
        used = size
    else:
        content_type = parameters.get("content_type", "base64")
        if content_type != "base64":
            raise InvalidRequest(
                f"input {IMAGE.name!r}: JSON strings must be base64 image files (content_type base64), "
                f"not {content_type!r}"
            )
        images = [_base64(item, index) for index, item in enumerate(_flat(tensor.get("data")))]
        used = 0
    if len(images) != count:
        raise InvalidRequest(f"input {IMAGE.name!r} has shape {shape} but {len(images)} elements")
    return images, used


def _pixels(tensor: dict[str, Any], binary: memoryview, max_images: int) -> tuple[list[Upload], int]:
    """UINT8 [N, H, W, 3]: binary (N*H*W*3 bytes, row-major) or JSON integers 0-255 (flat or nested).
    Binary pixels stay views of the body: each image's (H, W, 3) array is copied once, by Pillow."""
    shape = tensor.get("shape")
    valid = (
        isinstance(shape, list)
        and len(shape) == 4
        and all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape)
        and shape[3] == 3
    )
    if not valid:
        raise InvalidRequest(
            f"input {PIXELS.name!r} must have shape [N, H, W, 3] (8-bit RGB, height by width), not {shape!r}"
        )
    assert isinstance(shape, list)
    _at_most(shape[0], max_images)
    expected = math.prod(shape)
    size = _binary_size(tensor, PIXELS, binary)
    if size is not None:
        if size != expected:
            raise InvalidRequest(f"input {PIXELS.name!r} of shape {shape} is {expected} bytes, not {size}")
        return list(np.frombuffer(binary, np.uint8, count=size).reshape(shape)), size
    data = tensor.get("data")
    if not isinstance(data, list):
        raise InvalidRequest(f"input {PIXELS.name!r} has neither 'data' (a list of integers) nor binary_data_size")
    try:
        values = np.asarray(data)
    except ValueError:
        raise InvalidRequest(f"input {PIXELS.name!r}: 'data' is a ragged list; send {expected} integers") from None
    if values.size != expected:
        raise InvalidRequest(f"input {PIXELS.name!r} has shape {shape} but {values.size} values")
    if values.dtype.kind not in "iu" or values.min() < 0 or values.max() > 255:
        raise InvalidRequest(f"input {PIXELS.name!r}: 'data' must be integers from 0 to 255")
    return list(values.astype(np.uint8).reshape(shape)), 0


def _at_most(count: int, max_images: int) -> int:
    if count > max_images:
        raise PayloadTooLarge(f"{count} images in one request; at most {max_images} (API_MAX_BATCH_FILES)")
    return count


def _binary_size(tensor: dict[str, Any], spec: InputSpec, binary: memoryview) -> int | None:
    """The input's binary_data_size, checked against the bytes sent; None for JSON data."""
    size = _parameters(tensor).get("binary_data_size")
    if size is None:
        return None
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= len(binary):
        raise InvalidRequest(f"input {spec.name!r}: binary_data_size {size!r} exceeds the {len(binary)} bytes sent")
    if "data" in tensor:
        raise InvalidRequest(f"input {spec.name!r} has both binary_data_size and JSON data; send one")
    return size


def _length_prefixed(data: memoryview) -> Iterator[bytes]:
    offset = 0
    while offset < len(data):
        if offset + 4 > len(data):
            raise InvalidRequest(f"input {IMAGE.name!r}: a BYTES element's 4-byte length is cut off at byte {offset}")
        (length,) = struct.unpack_from("<I", data, offset)
        offset += 4
        if offset + length > len(data):
            raise InvalidRequest(
                f"input {IMAGE.name!r}: a BYTES element of {length} bytes runs past the input's binary_data_size"
            )
        yield bytes(data[offset : offset + length])
        offset += length


def _flat(data: Any) -> Iterator[Any]:
    if data is None:
        raise InvalidRequest(f"input {IMAGE.name!r} has neither 'data' nor binary_data_size")
    if isinstance(data, list):
        for item in data:
            yield from _flat(item) if isinstance(item, list) else (item,)
    else:
        yield data


def _base64(item: Any, index: int) -> bytes:
    if not isinstance(item, str):
        raise InvalidRequest(f"input {IMAGE.name!r} element {index}: JSON data must be base64 strings")
    try:
        return base64.b64decode(item, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"input {IMAGE.name!r} element {index} is not valid base64") from None


def _outputs(requested: Any, binary_default: bool) -> list[RequestedOutput]:
    if requested is None:
        return [RequestedOutput(OUTPUT, binary_default, 0)]
    if not isinstance(requested, list) or not requested:
        raise InvalidRequest("'outputs' must be a non-empty list")
    outputs = []
    for entry in requested:
        name = entry.get("name") if isinstance(entry, dict) else None
        if name != OUTPUT:
            raise InvalidRequest(f"unknown output {name!r}; this model has one output, {OUTPUT!r} (FP32 [N, C])")
        parameters = _parameters(entry)
        count = parameters.get("classification", 0)
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise InvalidRequest(f"output {OUTPUT!r}: 'classification' must be a count >= 0, not {count!r}")
        binary = _flag(
            {"binary_data": parameters.get("binary_data", binary_default)}, "binary_data", f"output {name!r}"
        )
        outputs.append(RequestedOutput(name, binary, count))
    return outputs


def classification(scores: np.ndarray, labels: Sequence[str], count: int) -> list[bytes]:
    """The classification extension: per image its `count` best as "score:index:label", best first
    (row-major over [N, min(count, C)]); scores with 6 decimals, as Triton writes them."""
    top = min(count, scores.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :top]
    return [f"{row[i]:f}:{i}:{labels[i]}".encode() for row, indices in zip(scores, order, strict=True) for i in indices]


def output_tensor(wanted: RequestedOutput, scores: np.ndarray, labels: Sequence[str]) -> OutputTensor:
    if wanted.class_count:
        strings = classification(scores, labels, wanted.class_count)
        shape = [scores.shape[0], min(wanted.class_count, scores.shape[1])]
        return OutputTensor(wanted.name, "BYTES", shape, strings, wanted.binary)
    return OutputTensor(wanted.name, "FP32", list(scores.shape), scores.astype("<f4"), wanted.binary)


def encode_infer(header: dict[str, Any], outputs: Sequence[OutputTensor]) -> tuple[bytes, dict[str, str]]:
    """The answer's body and headers: JSON, then the binary outputs' bytes when any is binary."""
    blobs: list[bytes] = []
    entries = []
    for tensor in outputs:
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape}
        if tensor.binary:
            blob = _tensor_bytes(tensor)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif isinstance(tensor.data, np.ndarray):
            entry["data"] = tensor.data.reshape(-1).tolist()
        else:
            entry["data"] = [item.decode() for item in tensor.data]
        entries.append(entry)
    text = json.dumps({**header, "outputs": entries}, separators=(",", ":")).encode()
    if not blobs:
        return text, {"content-type": "application/json"}
    return text + b"".join(blobs), {
        "content-type": "application/octet-stream",
        "inference-header-content-length": str(len(text)),
    }


def _tensor_bytes(tensor: OutputTensor) -> bytes:
    if isinstance(tensor.data, np.ndarray):
        return tensor.data.tobytes()
    return b"".join(struct.pack("<I", len(item)) + item for item in tensor.data)
