"""Every answer carries a request id, and every request is one JSON access-log line."""

from __future__ import annotations

import json
import logging

import httpx
import pytest

from api.logs import JsonFormatter
from tests.helpers import eventually


def _access_lines(caplog: pytest.LogCaptureFixture) -> list[dict]:
    return [json.loads(JsonFormatter().format(r)) for r in caplog.records if r.name == "api.access"]


def test_request_id_is_honoured_generated_and_logged(
    tiny_server: str, chelsea_jpeg: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="api.access")
    mine = httpx.post(tiny_server + "/api/v1/predict", files={"file": chelsea_jpeg}, headers={"X-Request-ID": "req-42"})
    assert mine.status_code == 200 and mine.headers["x-request-id"] == "req-42"
    generated = httpx.get(tiny_server + "/health")
    assert len(generated.headers["x-request-id"]) == 32
    hostile = httpx.get(tiny_server + "/health", headers={"X-Request-ID": "x" * 500})
    assert hostile.headers["x-request-id"] != "x" * 500  # not echoed: replaced by a generated one
    refused = httpx.post(tiny_server + "/api/v1/predict", content=b"not an image", headers={"X-Request-ID": "bad-1"})
    assert refused.status_code == 415 and refused.headers["x-request-id"] == "bad-1"
    # the line is written once the response is sent: the client may see the answer first
    expected = {"req-42", "bad-1", generated.headers["x-request-id"]}
    eventually(lambda: expected <= {line["request_id"] for line in _access_lines(caplog)}, what="access lines")
    lines = {line["request_id"]: line for line in _access_lines(caplog)}
    assert lines["req-42"]["status"] == 200 and lines["req-42"]["path"] == "/api/v1/predict"
    assert lines["req-42"]["method"] == "POST" and lines["req-42"]["latency_ms"] > 0
    assert lines["req-42"]["batch_size"] == 1 and lines["req-42"]["level"] == "INFO"
    assert lines["req-42"]["logger"] == "api.access" and "req-42" in lines["req-42"]["message"]
    assert lines["bad-1"]["status"] == 415
    assert lines[generated.headers["x-request-id"]]["path"] == "/health"


def test_a_server_fault_is_an_error_with_the_request_id(tiny_checkpoint, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    """A fault of ours (here: a route that fails) is logged at ERROR, traceback and request id included."""
    from api.http.app import LoadPolicy, create_app
    from tests.helpers import make_settings, running_server

    settings = make_settings(checkpoint_path=tiny_checkpoint, model_name="test_resnet")
    app = create_app(settings, policy=LoadPolicy(exit_on_failure=False))

    @app.get("/api/v1/fault")
    async def fault() -> None:
        raise RuntimeError("a bug of ours")

    caplog.set_level(logging.INFO)
    with running_server(settings, app=app) as url:
        answer = httpx.get(url + "/api/v1/fault", headers={"X-Request-ID": "fault-7"})
        assert answer.status_code == 500 and answer.json()["error"]["code"] == "internal_error"
        assert "a bug" not in answer.text  # no details to the client
        eventually(lambda: any(r.levelno == logging.ERROR for r in caplog.records), what="the error record")
    (error,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert error.name == "api.http.requestlog" and error.request_id == "fault-7" and error.exc_info is not None
    assert answer.headers["x-request-id"] == "fault-7"
