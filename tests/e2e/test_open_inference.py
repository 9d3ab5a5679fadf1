"""The Open Inference Protocol (KServe v2) with Triton's own HTTP client, against `cat-breeds-api serve`
(a separate process: tritonclient.http brings gevent, kept out of the server's process).

The demo model (real ImageNet weights) and real photos: every v2 answer must equal what /api/v1/predict
answers for the same file, because both go down the same engine path.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from PIL import Image
from tritonclient.utils import InferenceServerException

from tests.helpers import CLI, served_process

KEY = "v2-test-key"
MODEL = "cat-breeds"
PIXELS_MODEL = "cat-breeds-pixels"  # the same model, taking UINT8 [N, H, W, 3] pixels
MAX_FILES = 4
MAX_PIXELS = 1_000_000


@pytest.fixture(scope="module")
def server(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    cwd = tmp_path_factory.mktemp("v2")
    with served_process(
        [CLI, "serve"],
        cwd,
        API_CHECKPOINT_PATH=demo_dir,
        API_API_KEY=KEY,
        API_MAX_BATCH_FILES=MAX_FILES,
        API_MAX_IMAGE_PIXELS=MAX_PIXELS,
    ) as s:
        yield s.url


@pytest.fixture(scope="module")
def client(server: str) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(server.removeprefix("http://"), network_timeout=120)
    yield client
    client.close()


@pytest.fixture(scope="module")
def model(server: str) -> dict:
    return httpx.get(server + "/api/v1/model", headers=_key()).json()


def _key() -> dict[str, str]:
    """A fresh dict each call: tritonclient writes its own headers into the one it is given."""
    return {"X-API-Key": KEY}


def _images(*files: bytes, shape: list[int] | None = None) -> triton.InferInput:
    shape = shape or [len(files)]
    tensor = triton.InferInput("image", shape, "BYTES")
    tensor.set_data_from_numpy(np.array(files, dtype=np.object_).reshape(shape))
    return tensor


def _pixels(batch: np.ndarray, *, binary: bool = True) -> triton.InferInput:
    tensor = triton.InferInput("pixels", list(batch.shape), "UINT8")
    tensor.set_data_from_numpy(batch, binary_data=binary)
    return tensor


def _v1(server: str, data: bytes) -> dict:
    response = httpx.post(server + "/api/v1/predict?top_k=5", files={"file": ("x.jpg", data)}, headers=_key())
    assert response.status_code == 200, response.text
    return response.json()


def test_health_and_readiness(server: str, client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()  # open, like /health: probes carry no key
    # KServe's client reads these bodies, not only the status
    assert httpx.get(server + "/v2/health/live").json() == {"live": True}
    assert httpx.get(server + "/v2/health/ready").json() == {"ready": True}
    assert client.is_model_ready(MODEL, headers=_key())
    assert not client.is_model_ready("nope", headers=_key())
    assert not client.is_model_ready(MODEL, "9", headers=_key())


def test_metadata_and_config(client: triton.InferenceServerClient, model: dict) -> None:
    metadata = client.get_server_metadata()
    assert {"binary_tensor_data", "classification", "model_configuration"} <= set(metadata["extensions"])
    assert "model_repository" not in metadata["extensions"]  # API_ADMIN_KEY is not set here
    assert client.get_model_metadata(MODEL, headers=_key()) == {
        "name": MODEL,
        "versions": [model["version"]],
        "platform": "pytorch_timm",
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 1000]}],
    }
    assert model["version"] == model["checkpoint_sha256"][:12]
    assert client.get_model_metadata(MODEL, model["version"], headers=_key())["name"] == MODEL
    config = client.get_model_config(MODEL, headers=_key())
    assert config["max_batch_size"] == 0 and config["output"][0]["dims"] == [-1, 1000]
    assert json.loads(config["parameters"]["labels"]["string_value"]) == model["class_names"]


@pytest.mark.parametrize("shape", ["[N]", "[N, 1]"])
@pytest.mark.parametrize("binary", [True, False])
def test_infer_matches_api_v1(
    server: str,
    client: triton.InferenceServerClient,
    model: dict,
    chelsea_jpeg: bytes,
    coffee_jpeg: bytes,
    binary: bool,
    shape: str,
) -> None:
    files = (chelsea_jpeg, coffee_jpeg)
    images = _images(*files, shape=[2] if shape == "[N]" else [2, 1])
    outputs = None if binary else [triton.InferRequestedOutput("probabilities", binary_data=False)]
    result = client.infer(MODEL, [images], outputs=outputs, request_id="req-7", headers=_key())
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (2, 1000) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    response = result.get_response()
    assert response["id"] == "req-7" and response["model_name"] == MODEL
    assert response["model_version"] == model["version"]
    parameters = result.get_output("probabilities").get("parameters", {})
    assert (parameters.get("binary_data_size") == 2 * 1000 * 4) == binary
    for row, data in zip(probabilities, files, strict=True):
        v1 = _v1(server, data)
        assert v1["model"]["version"] == response["model_version"]  # both APIs name the version
        assert int(np.argmax(row)) == v1["predictions"][0]["index"]
        for label in v1["predictions"]:
            assert row[label["index"]] == pytest.approx(label["score"], rel=1e-6)


@pytest.mark.parametrize("binary", [True, False])
def test_pixels_model_scores_as_the_photo(
    server: str, client: triton.InferenceServerClient, model: dict, chelsea_jpeg: bytes, binary: bool
) -> None:
    """Pixels the client decoded go through the model's own resize, crop and normalization: a photo's
    pixels score as its file does (v1), and so do its mirror's (sent to v1 as a lossless PNG)."""
    photo = np.asarray(Image.open(io.BytesIO(chelsea_jpeg)).convert("RGB"))
    batch = np.stack([photo, photo[:, ::-1]])
    wanted = [triton.InferRequestedOutput("probabilities", binary_data=binary)]
    result = client.infer(PIXELS_MODEL, [_pixels(batch, binary=binary)], outputs=wanted, headers=_key())
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (2, 1000) and probabilities.dtype == np.float32
    response = result.get_response()
    assert response["model_name"] == PIXELS_MODEL and response["model_version"] == model["version"]
    mirror = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(batch[1])).save(mirror, format="PNG")
    for row, data in zip(probabilities, (chelsea_jpeg, mirror.getvalue()), strict=True):
        v1 = _v1(server, data)
        assert int(np.argmax(row)) == v1["predictions"][0]["index"]
        for label in v1["predictions"]:
            assert row[label["index"]] == pytest.approx(label["score"], rel=1e-6)
    assert not np.allclose(probabilities[0], probabilities[1])  # two images, two answers
    top = triton.InferRequestedOutput("probabilities", class_count=1)
    best = client.infer(PIXELS_MODEL, [_pixels(batch[:1])], outputs=[top], headers=_key()).as_numpy("probabilities")
    assert best[0][0].decode().split(":")[1] == str(int(np.argmax(probabilities[0])))


def test_pixels_model_metadata_config_and_refusals(
    server: str, client: triton.InferenceServerClient, model: dict
) -> None:
    assert client.is_model_ready(PIXELS_MODEL, headers=_key())
    assert client.get_model_metadata(PIXELS_MODEL, headers=_key()) == {
        "name": PIXELS_MODEL,
        "versions": [model["version"]],
        "platform": "pytorch_timm",
        "inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [-1, -1, -1, 3]}],
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 1000]}],
    }
    config = client.get_model_config(PIXELS_MODEL, headers=_key())
    assert config["input"] == [{"name": "pixels", "data_type": "TYPE_UINT8", "dims": [-1, -1, -1, 3]}]
    floats = triton.InferInput("pixels", [1, 8, 8, 3], "FP32")
    floats.set_data_from_numpy(np.zeros((1, 8, 8, 3), np.float32))
    wrong = _refusal(lambda: client.infer(PIXELS_MODEL, [floats], headers=_key()))
    assert wrong.status() == "400" and "must be UINT8" in wrong.message()
    rgba = _refusal(lambda: client.infer(PIXELS_MODEL, [_pixels(np.zeros((1, 8, 8, 4), np.uint8))], headers=_key()))
    assert rgba.status() == "400" and "[N, H, W, 3]" in rgba.message()
    files = _refusal(lambda: client.infer(PIXELS_MODEL, [_images(b"\xff\xd8")], headers=_key()))
    assert files.status() == "400" and "'pixels'" in files.message()
    huge = np.zeros((1, 1001, 1000, 3), np.uint8)  # one pixel row over API_MAX_IMAGE_PIXELS
    over = _refusal(lambda: client.infer(PIXELS_MODEL, [_pixels(huge)], headers=_key()))
    assert over.status() == "413" and "element 0" in over.message() and "API_MAX_IMAGE_PIXELS" in over.message()
    assert httpx.get(server + "/v2/health/ready").status_code == 200  # still ready


def test_classification_extension(client: triton.InferenceServerClient, model: dict, chelsea_jpeg: bytes) -> None:
    images = _images(chelsea_jpeg, chelsea_jpeg)
    raw = client.infer(MODEL, [images], headers=_key()).as_numpy("probabilities")
    top = triton.InferRequestedOutput("probabilities", class_count=5)
    classes = client.infer(MODEL, [images], outputs=[top], headers=_key()).as_numpy("probabilities")
    assert classes.shape == (2, 5)
    for row, scores in zip(classes, raw, strict=True):
        parsed = [element.decode().split(":") for element in row]  # binary: bytes
        assert [int(index) for _, index, _ in parsed] == list(np.argsort(-scores, kind="stable")[:5])
        assert [label for _, _, label in parsed] == [model["class_names"][int(index)] for _, index, _ in parsed]
        assert [float(score) for score, _, _ in parsed] == pytest.approx(np.sort(scores)[::-1][:5], abs=1e-6)
    capped = triton.InferRequestedOutput("probabilities", binary_data=False, class_count=5000)
    assert client.infer(MODEL, [images], outputs=[capped], headers=_key()).as_numpy("probabilities").shape == (2, 1000)


def _refusal(call: object) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as raised:
        call()  # type: ignore[operator]
    assert raised.value.message(), "an empty message: the body had no 'error'"
    return raised.value


def test_errors_are_raised_with_status_and_message(
    server: str, client: triton.InferenceServerClient, chelsea_jpeg: bytes
) -> None:
    image = _images(chelsea_jpeg)
    unknown = _refusal(lambda: client.infer("nope", [image], headers=_key()))
    assert unknown.status() == "404" and "'nope'" in unknown.message()
    version = _refusal(lambda: client.infer(MODEL, [image], model_version="9", headers=_key()))
    assert version.status() == "404" and "no version '9'" in version.message()
    corrupt = _refusal(lambda: client.infer(MODEL, [_images(chelsea_jpeg, chelsea_jpeg[:300])], headers=_key()))
    assert corrupt.status() == "400" and "element 1" in corrupt.message()
    not_an_image = _refusal(lambda: client.infer(MODEL, [_images(b"plain text, not an image")], headers=_key()))
    assert not_an_image.status() == "415"
    floats = triton.InferInput("image", [1, 3], "FP32")
    floats.set_data_from_numpy(np.zeros((1, 3), np.float32))
    wrong = _refusal(lambda: client.infer(MODEL, [floats], headers=_key()))
    assert wrong.status() == "400" and "must be BYTES" in wrong.message()
    many = _refusal(lambda: client.infer(MODEL, [_images(*[chelsea_jpeg] * (MAX_FILES + 1))], headers=_key()))
    assert many.status() == "413"
    keyless = _refusal(lambda: client.infer(MODEL, [image]))
    assert keyless.status() == "401"
    bearer = client.infer(MODEL, [image], headers={"Authorization": f"Bearer {KEY}"})
    assert bearer.as_numpy("probabilities").shape == (1, 1000)
    # FastAPI's own refusals (a route that does not exist) answer in the protocol's shape too
    assert httpx.get(server + "/v2/nothing/here").json() == {"error": "Not Found"}
    assert httpx.get(server + "/v2/health/ready").status_code == 200  # still ready


def test_plain_http_clients(server: str, chelsea_jpeg: bytes) -> None:
    """What a JSON-only client sends (base64 strings), and binary data with no Content-Type at all."""
    header = {
        "inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(chelsea_jpeg).decode()]}
        ]
    }
    as_json = httpx.post(f"{server}/v2/models/{MODEL}/infer", json=header, headers=_key())
    assert as_json.status_code == 200 and as_json.headers["content-type"] == "application/json"
    (output,) = as_json.json()["outputs"]
    assert output["shape"] == [1, 1000] and len(output["data"]) == 1000
    binary = {
        "inputs": [
            {
                "name": "image",
                "datatype": "BYTES",
                "shape": [1],
                "parameters": {"binary_data_size": len(chelsea_jpeg) + 4},
            }
        ]
    }
    text = json.dumps(binary).encode()
    body = text + len(chelsea_jpeg).to_bytes(4, "little") + chelsea_jpeg
    request = httpx.Request(
        "POST",
        f"{server}/v2/models/{MODEL}/infer",
        content=body,
        headers={**_key(), "Inference-Header-Content-Length": str(len(text))},
    )
    assert "content-type" not in request.headers  # as tritonclient sends it
    with httpx.Client() as session:
        answered = session.send(request)
    assert answered.status_code == 200
    assert answered.json()["outputs"][0]["data"] == pytest.approx(output["data"], rel=1e-6)


def test_metrics_count_v2_and_name_the_version(server: str, model: dict) -> None:
    text = httpx.get(server + "/metrics").text
    assert f'cat_breeds_api_model_info{{architecture="{model["architecture"]}"' in text
    assert f'version="{model["version"]}"' in text
    assert 'route="/v2/models/{name}/infer"' in text
