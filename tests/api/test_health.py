"""Health is honest: not ready (503 + reason) until loaded, and after a failed load; alive meanwhile."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.helpers import make_settings, running_server, settled_health


def test_ready_server_reports_ready_everywhere(tiny_server: str) -> None:
    for path in ("/health", "/health/ready"):
        body = httpx.get(tiny_server + path).json()
        assert body["status"] == "ready" and body["ready"] is True and body["reason"] is None
        assert body["architecture"] == "test_resnet" and body["device"] == "cpu"
    assert httpx.get(tiny_server + "/health/live").json() == {"status": "alive"}


def test_failed_load_is_never_reported_healthy(tmp_path: Path, chelsea_jpeg: bytes) -> None:
    missing = tmp_path / "outputs" / "checkpoints" / "fold_0" / "best_model.pt"
    with running_server(make_settings(checkpoint_path=missing), wait_ready=False) as url:
        health = settled_health(url)
        assert health.status_code == 503
        body = health.json()
        assert body["status"] == "failed" and body["ready"] is False
        assert str(missing) in body["reason"]
        assert httpx.get(url + "/health/ready").status_code == 503
        assert httpx.get(url + "/health/live").status_code == 200
        predict = httpx.post(url + "/api/v1/predict", files={"file": chelsea_jpeg})
        assert predict.status_code == 503 and predict.headers["retry-after"]
        assert predict.json()["error"]["code"] == "not_ready"
        assert httpx.get(url + "/api/v1/model").status_code == 503
        assert "cat_breeds_api_model_ready 0.0" in httpx.get(url + "/metrics").text


def test_no_checkpoint_configured_says_how_to_fix() -> None:
    with running_server(make_settings(), wait_ready=False) as url:
        body = settled_health(url).json()
        assert body["status"] == "failed"
        assert "API_CHECKPOINT_PATH is not set" in body["reason"]


def test_cors_is_off_by_default_and_follows_the_setting(tiny_server: str, tiny_checkpoint: Path) -> None:
    preflight = {"origin": "http://localhost:3000", "access-control-request-method": "POST"}
    closed = httpx.options(tiny_server + "/api/v1/predict", headers=preflight)
    assert "access-control-allow-origin" not in closed.headers
    settings = make_settings(
        checkpoint_path=tiny_checkpoint, model_name="test_resnet", cors_origins="http://localhost:3000"
    )
    with running_server(settings) as url:
        opened = httpx.options(url + "/api/v1/predict", headers=preflight)
        assert opened.status_code == 200
        assert opened.headers["access-control-allow-origin"] == "http://localhost:3000"
        other = httpx.options(url + "/api/v1/predict", headers={**preflight, "origin": "http://evil.example"})
        assert "access-control-allow-origin" not in other.headers
