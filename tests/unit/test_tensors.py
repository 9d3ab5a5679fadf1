"""The v2 infer body codec, against bodies Triton's own client writes and reads (no server)."""

from __future__ import annotations

import base64
import json
import struct

import numpy as np
import pytest
import tritonclient.http as triton

from api.errors import InvalidRequest, PayloadTooLarge
from api.http.tensors import (
    HEADER_LENGTH,
    PIXELS,
    RequestedOutput,
    classification,
    encode_infer,
    output_tensor,
    parse_infer,
)

LABELS = ("abyssinian", "bengal", "birman", "bombay", "persian")
FILES = [b"\xff\xd8first-file", b"\x89PNGsecond", b""]


def _client_body(shape: list[int], *, outputs: list[triton.InferRequestedOutput] | None = None, **kw: object):
    image = triton.InferInput("image", shape, "BYTES")
    image.set_data_from_numpy(np.array(FILES[: shape[0]], dtype=np.object_).reshape(shape), **kw)  # type: ignore[arg-type]
    body, json_size = triton.InferenceServerClient.generate_request_body([image], outputs=outputs, request_id="r-1")
    return body, (str(json_size) if json_size is not None else None)


@pytest.mark.parametrize("shape", [[3], [3, 1]])
def test_reads_tritonclients_binary_bytes_tensor(shape: list[int]) -> None:
    body, length = _client_body(shape)
    request = parse_infer(body, length, max_images=16)
    assert request.images == FILES
    assert request.id == "r-1"
    # no outputs named: tritonclient asks for every output in binary
    assert request.outputs == [RequestedOutput("probabilities", True, 0)]


def test_reads_json_base64_and_per_output_choices() -> None:
    header = {
        "inputs": [
            {
                "name": "image",
                "datatype": "BYTES",
                "shape": [2, 1],
                "data": [[base64.b64encode(f).decode()] for f in FILES[:2]],
            }
        ],
        "outputs": [{"name": "probabilities", "parameters": {"classification": 3, "binary_data": False}}],
    }
    request = parse_infer(json.dumps(header).encode(), None, max_images=16)
    assert request.images == FILES[:2] and request.id is None
    assert request.outputs == [RequestedOutput("probabilities", False, 3)]


@pytest.mark.parametrize(
    ("header", "phrase"),
    [
        ({"inputs": []}, "exactly one input"),
        (
            {"inputs": [{"name": "pixels", "datatype": "BYTES", "shape": [1], "data": ["AA=="]}]},
            "unknown input 'pixels'",
        ),
        ({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1], "data": [1.0]}]}, "must be BYTES"),
        (
            {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1, 3], "data": ["AA=="]}]},
            "shape [N] or [N, 1]",
        ),
        ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": ["AA=="]}]}, "but 1 elements"),
        (
            {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["not base64!"]}]},
            "element 0 is not",
        ),
        ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1]}]}, "neither 'data'"),
        (
            {
                "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["AA=="]}],
                "outputs": [{"name": "logits"}],
            },
            "unknown output 'logits'",
        ),
        (
            {
                "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["AA=="]}],
                "outputs": [{"name": "probabilities", "parameters": {"classification": "5"}}],
            },
            "'classification' must be a count",
        ),
    ],
)
def test_malformed_json_requests_say_what_is_wrong(header: dict, phrase: str) -> None:
    with pytest.raises(InvalidRequest) as raised:
        parse_infer(json.dumps(header).encode(), None, max_images=16)
    assert phrase in raised.value.message


def test_malformed_binary_requests_say_what_is_wrong() -> None:
    body, length = _client_body([2])
    assert length is not None
    with pytest.raises(InvalidRequest, match="binary_data_size 30 exceeds the 27 bytes sent"):  # cut short
        parse_infer(body[:-3], length, max_images=16)
    header = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 8}}]}
    text = json.dumps(header).encode()
    lying = struct.pack("<I", 9) + b"four"  # says 9 bytes, 4 follow
    with pytest.raises(InvalidRequest, match="runs past"):
        parse_infer(text + lying, str(len(text)), max_images=16)
    with pytest.raises(InvalidRequest, match="bytes of binary data follow"):
        parse_infer(body + b"extra", length, max_images=16)
    with pytest.raises(InvalidRequest, match="not JSON"):  # binary without the header that splits it
        parse_infer(body, None, max_images=16)
    with pytest.raises(InvalidRequest, match="raw binary requests"):
        parse_infer(body, "0", max_images=16)
    with pytest.raises(InvalidRequest, match="not a length"):
        parse_infer(body, str(len(body) + 1), max_images=16)
    with pytest.raises(PayloadTooLarge, match="API_MAX_BATCH_FILES"):
        parse_infer(body, length, max_images=1)


def _pixels_body(array: np.ndarray, *, binary: bool) -> tuple[bytes, str | None]:
    pixels = triton.InferInput("pixels", list(array.shape), "UINT8")
    pixels.set_data_from_numpy(array, binary_data=binary)
    body, json_size = triton.InferenceServerClient.generate_request_body([pixels])
    return body, (str(json_size) if json_size is not None else None)


@pytest.mark.parametrize("binary", [True, False])
def test_reads_tritonclients_pixels(binary: bool) -> None:
    array = np.random.default_rng(1).integers(0, 256, (3, 5, 7, 3), dtype=np.uint8)
    body, length = _pixels_body(array, binary=binary)
    assert (length is not None) == binary
    request = parse_infer(body, length, max_images=16, spec=PIXELS)
    assert len(request.images) == 3
    for image, expected in zip(request.images, array, strict=True):
        assert isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.shape == (5, 7, 3)
        np.testing.assert_array_equal(image, expected)
    if binary:  # views of the body, not copies
        assert all(np.shares_memory(image, np.frombuffer(body, np.uint8)) for image in request.images)


def test_pixels_json_may_be_nested() -> None:
    array = np.arange(2 * 2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 2, 3)
    header = {"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [2, 2, 2, 3], "data": array.tolist()}]}
    request = parse_infer(json.dumps(header).encode(), None, max_images=16, spec=PIXELS)
    np.testing.assert_array_equal(np.stack(request.images), array)  # type: ignore[arg-type]


def _pixels_json(shape: object, data: object, datatype: str = "UINT8") -> bytes:
    return json.dumps({"inputs": [{"name": "pixels", "datatype": datatype, "shape": shape, "data": data}]}).encode()


@pytest.mark.parametrize(
    ("body", "phrase"),
    [
        (_pixels_json([1, 1, 1, 3], [0, 0, 0], "FP32"), "must be UINT8"),
        (_pixels_json([1, 1, 3], [0, 0, 0]), "shape [N, H, W, 3]"),
        (_pixels_json([1, 1, 1, 4], [0, 0, 0, 0]), "shape [N, H, W, 3]"),
        (_pixels_json([1, 0, 1, 3], []), "shape [N, H, W, 3]"),
        (_pixels_json([1, 1, 1, 3], [0, 0]), "but 2 values"),
        (_pixels_json([1, 1, 1, 3], [0, 256, 0]), "integers from 0 to 255"),
        (_pixels_json([1, 1, 1, 3], [0, -1, 0]), "integers from 0 to 255"),
        (_pixels_json([1, 1, 1, 3], [0.5, 1, 0]), "integers from 0 to 255"),
        (_pixels_json([1, 1, 1, 3], [True, False, True]), "integers from 0 to 255"),
        (_pixels_json([1, 1, 1, 3], [[0, 1], [2]]), "ragged"),
        (_pixels_json([1, 1, 1, 3], None), "neither 'data'"),
        (_pixels_json([1, 1, 1, 3], ["AAAA"]), "but 1 values"),
        (
            json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["AA=="]}]}).encode(),
            "unknown input 'image'; this model takes one input, 'pixels' (UINT8)",
        ),
    ],
)
def test_malformed_pixels_say_what_is_wrong(body: bytes, phrase: str) -> None:
    with pytest.raises(InvalidRequest) as raised:
        parse_infer(body, None, max_images=16, spec=PIXELS)
    assert phrase in raised.value.message


def test_binary_pixels_must_be_the_shapes_bytes() -> None:
    body, length = _pixels_body(np.zeros((2, 4, 4, 3), np.uint8), binary=True)
    assert length is not None
    header = json.loads(body[: int(length)])
    header["inputs"][0]["shape"] = [2, 4, 5, 3]  # says more pixels than were sent
    text = json.dumps(header).encode()
    with pytest.raises(InvalidRequest, match=r"is 120 bytes, not 96"):
        parse_infer(text + body[int(length) :], str(len(text)), max_images=16, spec=PIXELS)
    with pytest.raises(PayloadTooLarge, match="API_MAX_BATCH_FILES"):
        parse_infer(body, length, max_images=1, spec=PIXELS)


def test_classification_is_score_index_label_best_first() -> None:
    scores = np.array([[0.1, 0.6, 0.05, 0.2, 0.05], [0.3, 0.1, 0.2, 0.15, 0.25]], dtype=np.float32)
    assert classification(scores, LABELS, 2) == [
        b"0.600000:1:bengal",
        b"0.200000:3:bombay",
        b"0.300000:0:abyssinian",
        b"0.250000:4:persian",
    ]
    assert len(classification(scores, LABELS, 100)) == 2 * 5  # capped at the class count


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("class_count", [0, 3])
def test_answers_parse_with_tritonclient(binary: bool, class_count: int) -> None:
    scores = np.random.default_rng(0).random((2, 5), dtype=np.float32)
    tensor = output_tensor(RequestedOutput("probabilities", binary, class_count), scores, LABELS)
    body, headers = encode_infer({"model_name": "cat-breeds", "model_version": "abc", "id": "r-1"}, [tensor])
    length = headers.get(HEADER_LENGTH)
    assert (length is not None) == binary and headers["content-type"].endswith("octet-stream" if binary else "json")
    result = triton.InferenceServerClient.parse_response_body(body, header_length=int(length) if length else None)
    answer = result.as_numpy("probabilities")
    assert result.get_response()["model_version"] == "abc"
    if class_count:
        assert answer.shape == (2, 3)
        first = answer[0][0].decode() if isinstance(answer[0][0], bytes) else answer[0][0]
        score, index, label = first.split(":")
        assert int(index) == int(np.argmax(scores[0])) and label == LABELS[int(index)]
        assert float(score) == pytest.approx(float(scores[0].max()), abs=1e-6)
    else:
        np.testing.assert_array_equal(answer, scores)
        if binary:
            assert result.get_output("probabilities")["parameters"]["binary_data_size"] == 2 * 5 * 4


def test_bytes_elements_are_length_prefixed() -> None:
    tensor = output_tensor(RequestedOutput("probabilities", True, 1), np.array([[0.2, 0.8]], np.float32), ("a", "b"))
    body, headers = encode_infer({"model_name": "m", "model_version": "v"}, [tensor])
    blob = body[int(headers[HEADER_LENGTH]) :]
    assert blob == struct.pack("<I", len(b"0.800000:1:b")) + b"0.800000:1:b"
