"""The prediction API through a real server on 127.0.0.1."""

from __future__ import annotations

import base64
import hashlib
import io
import math
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import IMAGENET_CATS, load_model, scores_of

PREDICT = "/api/v1/predict"


def _direct_scores(checkpoint: Path, image: Image.Image) -> torch.Tensor:
    classifier = load_model(checkpoint, model_name="test_resnet", device="cpu")
    return scores_of(classifier, image)[0]


def test_demo_model_ranks_a_cat_first_for_chelsea(demo_server: str, chelsea_jpeg: bytes) -> None:
    response = httpx.post(demo_server + PREDICT, files={"file": ("chelsea.jpg", chelsea_jpeg, "image/jpeg")})
    assert response.status_code == 200, response.text
    body = response.json()
    top3 = [p["index"] for p in body["predictions"][:3]]
    assert top3[0] in IMAGENET_CATS and set(top3) <= IMAGENET_CATS
    assert body["predictions"][0]["label"] in {"tiger cat", "Egyptian cat", "tabby, tabby cat"}
    assert body["model"]["architecture"] == "tf_efficientnet_lite0"
    assert body["image"] == {"width": 451, "height": 300, "format": "JPEG"}


def test_multipart_answer_matches_the_model_called_directly(
    tiny_server: str, tiny_checkpoint: Path, chelsea: Image.Image, chelsea_jpeg: bytes
) -> None:
    response = httpx.post(tiny_server + PREDICT, params={"top_k": 5}, files={"file": ("c.jpg", chelsea_jpeg)})
    assert response.status_code == 200
    body = response.json()
    expected = _direct_scores(tiny_checkpoint, Image.open(io.BytesIO(chelsea_jpeg)).convert("RGB"))
    got = {p["index"]: p["score"] for p in body["predictions"]}
    assert len(got) == 5
    for index, score in got.items():
        assert math.isclose(score, float(expected[index]), rel_tol=1e-4, abs_tol=1e-6)
    scores = [p["score"] for p in body["predictions"]]
    assert scores == sorted(scores, reverse=True)
    assert math.isclose(sum(scores), 1.0, rel_tol=1e-5)
    labels = {p["label"] for p in body["predictions"]}
    assert labels == {"abyssinian", "bengal", "birman", "bombay", "persian"}  # from classes.txt beside it
    assert set(body["timing"]) == {"decode_ms", "inference_ms", "total_ms"}
    assert body["timing"]["total_ms"] >= body["timing"]["inference_ms"] > 0


def test_raw_body_octet_stream_and_base64_give_the_same_answer(tiny_server: str, chelsea_jpeg: bytes) -> None:
    multipart = httpx.post(tiny_server + PREDICT, files={"file": ("c.jpg", chelsea_jpeg)}).json()
    raw = httpx.post(tiny_server + PREDICT, content=chelsea_jpeg, headers={"content-type": "image/jpeg"}).json()
    octet = httpx.post(
        tiny_server + PREDICT, content=chelsea_jpeg, headers={"content-type": "application/octet-stream"}
    ).json()
    b64 = httpx.post(tiny_server + PREDICT, json={"image": base64.b64encode(chelsea_jpeg).decode()}).json()
    data_url = "data:image/jpeg;base64," + base64.b64encode(chelsea_jpeg).decode()
    from_url = httpx.post(tiny_server + PREDICT, json={"image": data_url}).json()
    for other in (raw, octet, b64, from_url):
        assert other["predictions"] == multipart["predictions"]


def test_wrong_declared_type_is_ignored(tiny_server: str, chelsea_jpeg: bytes) -> None:
    response = httpx.post(tiny_server + PREDICT, files={"file": ("notes.txt", chelsea_jpeg, "text/plain")})
    assert response.status_code == 200


def test_top_k(tiny_server: str, chelsea_jpeg: bytes) -> None:
    default = httpx.post(tiny_server + PREDICT, files={"file": chelsea_jpeg}).json()
    assert len(default["predictions"]) == 5  # API_TOP_K default 5, capped by the 5 classes
    one = httpx.post(tiny_server + PREDICT, params={"top_k": 1}, files={"file": chelsea_jpeg}).json()
    assert one["predictions"] == default["predictions"][:1]
    bad = httpx.post(tiny_server + PREDICT, params={"top_k": 0}, files={"file": chelsea_jpeg})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "validation_error"


def test_batch_gives_a_result_or_an_error_per_file(tiny_server: str, chelsea_jpeg: bytes, coffee_jpeg: bytes) -> None:
    files = [
        ("file", ("cat.jpg", chelsea_jpeg)),
        ("file", ("notes.txt", b"not an image")),
        ("file", ("coffee.jpg", coffee_jpeg)),
    ]
    response = httpx.post(tiny_server + PREDICT + "/batch", params={"top_k": 2}, files=files)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["filename"] for r in results] == ["cat.jpg", "notes.txt", "coffee.jpg"]
    assert [r["ok"] for r in results] == [True, False, True]
    assert results[1]["error"]["code"] == "unsupported_media_type"
    single = httpx.post(tiny_server + PREDICT, params={"top_k": 2}, files={"file": chelsea_jpeg}).json()
    for got, want in zip(results[0]["result"]["predictions"], single["predictions"], strict=True):
        assert got["index"] == want["index"] and math.isclose(got["score"], want["score"], rel_tol=1e-4)


def test_batch_refuses_more_files_than_allowed(tiny_server: str, chelsea_jpeg: bytes) -> None:
    files = [("file", (f"{i}.jpg", chelsea_jpeg)) for i in range(5)]  # the fixture allows 4
    response = httpx.post(tiny_server + PREDICT + "/batch", files=files)
    assert response.status_code == 400
    assert "Too many files" in response.json()["error"]["message"]


def test_model_info(tiny_server: str, tiny_checkpoint: Path) -> None:
    info = httpx.get(tiny_server + "/api/v1/model").json()
    assert info["architecture"] == "test_resnet"
    assert info["num_classes"] == 5 and info["class_names"][0] == "abyssinian"
    assert info["preprocessing"]["input_size"] == [3, 160, 160]
    assert info["preprocessing"]["crop_pct"] == pytest.approx(0.95)
    assert info["device"] == "cpu" and info["dtype"] == "float32"
    assert info["checkpoint_path"] == str(tiny_checkpoint)
    assert info["weights_key"] == "model_state_dict"
    assert info["checkpoint_sha256"] == hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()


def test_metrics_count_every_answer_by_route_template_and_status(tiny_server: str, chelsea_jpeg: bytes) -> None:
    def counts() -> dict[tuple[str, str, str], float]:
        text = httpx.get(tiny_server + "/metrics").text
        return {
            (s.labels["route"], s.labels["method"], s.labels["status"]): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == "cat_breeds_api_http_requests_total"
        }

    before = counts()
    assert httpx.post(tiny_server + PREDICT, files={"file": chelsea_jpeg}).status_code == 200
    assert httpx.post(tiny_server + PREDICT, files={"file": ("a.txt", b"not an image")}).status_code == 415
    assert httpx.get(tiny_server + "/no/such/page/12345").status_code == 404
    after = counts()
    grew = {key: after[key] - before.get(key, 0) for key in after if after[key] != before.get(key, 0)}
    assert grew[(PREDICT, "POST", "200")] == 1
    assert grew[(PREDICT, "POST", "415")] == 1
    assert grew[("unmatched", "GET", "404")] == 1  # never the raw path: label values stay bounded
    text = httpx.get(tiny_server + "/metrics").text
    assert "cat_breeds_api_http_requests_in_flight 1.0" in text  # only this scrape is in flight


def test_metrics_count_requests_and_images(tiny_server: str, chelsea_jpeg: bytes) -> None:
    httpx.post(tiny_server + PREDICT, files={"file": chelsea_jpeg})
    text = httpx.get(tiny_server + "/metrics").text
    assert 'cat_breeds_api_http_requests_total{method="POST",route="/api/v1/predict",status="200"}' in text
    assert 'cat_breeds_api_images_total{outcome="ok"}' in text
    assert "cat_breeds_api_model_ready 1.0" in text
    assert "cat_breeds_api_inference_duration_seconds_count" in text
    # where the time went, per stage: every stage saw this image
    stages = {
        sample.labels["stage"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "cat_breeds_api_stage_duration_seconds_count"
    }
    assert set(stages) == {"read", "decode", "queue", "forward"} and min(stages.values()) >= 1, stages


def test_openapi_documents_every_route_and_body(tiny_server: str) -> None:
    spec = httpx.get(tiny_server + "/openapi.json").json()
    paths = spec["paths"]
    for path in (
        "/health",
        "/health/live",
        "/health/ready",
        "/api/v1/predict",
        "/api/v1/predict/batch",
        "/api/v1/model",
    ):
        assert path in paths
    body = paths["/api/v1/predict"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "image/*", "application/json"} <= set(body)
    assert {"200", "400", "413", "415", "422", "503"} <= set(paths["/api/v1/predict"]["post"]["responses"])
    assert httpx.get(tiny_server + "/docs").status_code == 200
