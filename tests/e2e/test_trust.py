"""Answers a person can trust, as users run the service (`cat-breeds-api serve`, separate processes):
the 3 folds of tests/digits.py served as one model with their spread, the fitted temperature and
its figures, "not sure", Grad-CAM explanations under their own limit, and a swap to a folder of folds."""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.digits import IMAGE_SIZE, Digits
from tests.helpers import CLI, ServerProcess, served_process

ADMIN = {"X-API-Key": "admin-secret"}


@pytest.fixture(scope="module")
def server(digits: Digits, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The folds, calibrated on their labeled held-out digits, every runtime measured (auto)."""
    cwd = tmp_path_factory.mktemp("trust")
    with served_process(
        [CLI, "serve"],
        cwd,
        API_CHECKPOINT_PATH=digits.folds,
        API_IMAGE_SIZE=IMAGE_SIZE,
        API_EVAL_DIR=digits.eval_dir,
        API_CACHE_DIR=cwd / "cache",
        API_MAX_EXPLANATIONS=1,
    ) as process:
        yield process


def _png(digits: Digits, index: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(digits.images[index]).convert("RGB").save(out, format="PNG")
    return out.getvalue()


def _predict(url: str, body: bytes, **params: object) -> httpx.Response:
    return httpx.post(f"{url}/api/v1/predict", params=params, files={"file": ("d.png", body)}, timeout=60)


def test_explanations_beyond_their_limit_are_refused_at_once_while_predictions_answer(
    server: ServerProcess, digits: Digits
) -> None:
    """The first explanations of this server: one starts the explaining process (seconds), the
    others arrive meanwhile and find the limit (API_MAX_EXPLANATIONS=1) taken. Runs first in this file."""

    async def burst() -> tuple[list[httpx.Response], list[httpx.Response]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:

            def post(explain: bool) -> object:
                files = {"file": ("d.png", _png(digits, 0))}
                return client.post("/api/v1/predict", params={"explain": explain}, files=files)

            first = asyncio.ensure_future(post(True))
            await asyncio.sleep(0)
            explained = await asyncio.gather(first, *(post(True) for _ in range(3)), return_exceptions=False)
            predicted = await asyncio.gather(*(post(False) for _ in range(4)))
            return list(explained), list(predicted)  # type: ignore[arg-type]

    explained, predicted = asyncio.run(burst())
    statuses = sorted(r.status_code for r in explained)
    assert statuses.count(200) >= 1 and statuses.count(503) >= 1, statuses
    busy = next(r for r in explained if r.status_code == 503)
    assert busy.json()["error"]["code"] == "explain_busy" and busy.headers["Retry-After"] == "1"
    assert all(r.status_code == 200 and r.json()["explanation"] is None for r in predicted)


def test_the_answer_names_the_folds_and_each_scores_spread(server: ServerProcess, digits: Digits) -> None:
    body = _predict(server.url, _png(digits, 1), top_k=10).json()
    assert body["model"]["folds"] == 3
    scores = [p["score"] for p in body["predictions"]]
    spreads = [p["spread"] for p in body["predictions"]]
    assert abs(sum(scores) - 1) < 1e-3 and all(s is not None and 0 <= s <= 0.5 for s in spreads)
    assert body["predictions"][0]["index"] == int(digits.labels[1])

    metrics = httpx.get(server.url + "/metrics").text
    assert 'folds="3"' in next(line for line in metrics.splitlines() if line.startswith("cat_breeds_api_model_info{"))
    v2 = httpx.post(
        server.url + "/v2/models/cat-breeds/infer",
        json={
            "inputs": [
                {
                    "name": "image",
                    "shape": [1],
                    "datatype": "BYTES",
                    "data": [base64.b64encode(_png(digits, 1)).decode()],
                }
            ]
        },
        timeout=60,
    )
    assert v2.status_code == 200, v2.text
    assert v2.json()["parameters"]["folds"] == 3


def test_uncertain_marks_answers_below_min_confidence(server: ServerProcess, digits: Digits) -> None:
    answers = [_predict(server.url, _png(digits, i)).json() for i in range(40)]
    assert all(a["uncertain"] is False for a in answers)  # API_MIN_CONFIDENCE unset: 0
    least = min(range(40), key=lambda i: answers[i]["predictions"][0]["score"])  # the least sure of 40 digits
    top = answers[least]
    score = top["predictions"][0]["score"]
    assert score < 1.0
    above = _predict(server.url, _png(digits, least), min_confidence=(score + 1.0) / 2).json()
    below = _predict(server.url, _png(digits, least), min_confidence=score / 2).json()
    assert above["uncertain"] is True and above["predictions"] == top["predictions"]  # labels still given
    assert below["uncertain"] is False
    assert _predict(server.url, _png(digits, least), min_confidence=1.5).status_code == 422


def test_the_model_page_data_lists_folds_and_the_fitted_temperature(server: ServerProcess, digits: Digits) -> None:
    model = httpx.get(server.url + "/api/v1/model").json()
    assert model["fold_count"] == 3 and [f["name"] for f in model["folds"]] == ["fold_0", "fold_1", "fold_2"]
    calibration = model["calibration"]
    assert calibration["source"] == "fitted" and calibration["ece_after"] <= calibration["ece_before"]
    assert len(calibration["reliability_after"]) == 15 and len(calibration["confusion"]) == 10
    assert len(calibration["fold_accuracy"]) == 3
    ready = next(r for r in server.records() if r.get("event") == "ready")
    assert "3 folds as one model" in ready["message"]
    assert ready["calibration"]["temperature"] == calibration["temperature"]
    assert "confusion" not in ready["calibration"]  # its tables stay out of the log line


def test_explain_returns_a_heatmap_on_the_digits_own_strokes(server: ServerProcess, digits: Digits) -> None:
    """Grad-CAM points at the digit, not at the blank canvas around it (the default stage: at 32 px
    resnet10t's layer1, 8 x 8), for nearly every digit and by far on average."""
    on_strokes, off_strokes = [], []
    for index in range(3, 23):
        body = _predict(server.url, _png(digits, index), explain=True).json()
        explanation = body["explanation"]
        assert explanation["index"] == body["predictions"][0]["index"]
        assert (explanation["width"], explanation["height"]) == (IMAGE_SIZE, IMAGE_SIZE)
        heatmap = np.asarray(Image.open(io.BytesIO(base64.b64decode(explanation["heatmap_png"]))), dtype=float)
        assert heatmap.shape == (IMAGE_SIZE, IMAGE_SIZE) and heatmap.max() > 0
        # what the model saw of the upload: its crop, in the upload's pixels
        left, top, right, bottom = explanation["box"]
        assert 0 <= left < right <= IMAGE_SIZE and 0 <= top < bottom <= IMAGE_SIZE
        seen = np.asarray(
            Image.fromarray(digits.images[index]).resize((IMAGE_SIZE, IMAGE_SIZE), box=(left, top, right, bottom))
        )
        strokes = seen > 128
        on_strokes.append(heatmap[strokes].mean())
        off_strokes.append(heatmap[~strokes].mean())
        assert explanation["memory_mb"] > 0 and explanation["explain_ms"] > 0
    print(f"heat on strokes / off: {np.round(np.array(on_strokes) / np.array(off_strokes), 2)}")
    assert np.mean(on_strokes) > 1.5 * np.mean(off_strokes)
    assert sum(a > b for a, b in zip(on_strokes, off_strokes, strict=True)) >= 0.9 * len(on_strokes)


def test_a_swap_accepts_a_folder_of_folds(digits: Digits, tmp_path: Path) -> None:
    with served_process(
        [CLI, "serve"],
        tmp_path,
        API_CHECKPOINT_PATH=digits.folds / "fold_0" / "best_model.pt",
        API_MODEL_REPOSITORY=digits.folds,
        API_IMAGE_SIZE=IMAGE_SIZE,
        API_RUNTIME="torch",
        API_PRECISION="fp32",
        API_ADMIN_KEY=ADMIN["X-API-Key"],
    ) as single:
        before = _predict(single.url, _png(digits, 0)).json()
        assert before["model"]["folds"] == 1 and before["predictions"][0]["spread"] is None
        loaded = httpx.post(
            f"{single.url}/v2/repository/models/cat-breeds/load",
            json={"parameters": {"checkpoint": "."}},
            headers=ADMIN,
            timeout=300,
        )
        assert loaded.status_code == 200, loaded.text
        after = _predict(single.url, _png(digits, 0)).json()
        assert after["model"]["folds"] == 3 and after["predictions"][0]["spread"] is not None
        assert after["model"]["version"] != before["model"]["version"]
