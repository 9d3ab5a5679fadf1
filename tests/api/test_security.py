"""Optional API key on prediction routes; health stays open; no server banner."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.helpers import make_settings, running_server

KEY = "s3cret-key-for-tests"


def test_api_key_guards_prediction_and_model_routes(tiny_checkpoint: Path, chelsea_jpeg: bytes) -> None:
    settings = make_settings(checkpoint_path=tiny_checkpoint, model_name="test_resnet", api_key=KEY)
    with running_server(settings) as url:
        predict = url + "/api/v1/predict"
        for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            response = httpx.post(predict, files={"file": chelsea_jpeg}, headers=headers)
            assert response.status_code == 401, headers
            assert response.json() == {"error": {"code": "unauthorized", "message": "missing or invalid API key"}}
            assert response.headers["www-authenticate"] == "Bearer"
        assert httpx.get(url + "/api/v1/model").status_code == 401
        assert httpx.post(predict, files={"file": chelsea_jpeg}, headers={"X-API-Key": KEY}).status_code == 200
        bearer = {"Authorization": f"Bearer {KEY}"}
        assert httpx.post(predict, files={"file": chelsea_jpeg}, headers=bearer).status_code == 200
        assert httpx.get(url + "/api/v1/model", headers=bearer).status_code == 200
        for open_route in ("/health", "/health/live", "/health/ready", "/metrics"):
            assert httpx.get(url + open_route).status_code == 200, open_route
        schemes = httpx.get(url + "/openapi.json").json()["components"]["securitySchemes"]
        assert {"APIKeyHeader", "HTTPBearer"} <= set(schemes)


def test_no_key_configured_means_open(tiny_server: str, chelsea_jpeg: bytes) -> None:
    assert httpx.post(tiny_server + "/api/v1/predict", files={"file": chelsea_jpeg}).status_code == 200


def test_secret_is_not_in_settings_repr() -> None:
    settings = make_settings(api_key=KEY)
    assert KEY not in repr(settings) and KEY not in str(settings.model_dump())
