"""The v2 routes' edges a client cannot reach through tritonclient: model management behind its own
key (off without it), its refusals, the in-process mode's answer, and body limits in the v2 shape."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import make_settings, running_server

ADMIN = "admin-key-for-tests"
LOAD = "/v2/repository/models/cat-breeds/load"


def _settings(checkpoint: Path, **values: object):
    return make_settings(
        checkpoint_path=checkpoint,
        model_name="test_resnet",
        runtime="torch",
        precision="fp32",
        max_upload_mb=1,
        **values,
    )


@pytest.fixture(scope="module")
def managed(tiny_checkpoint: Path) -> Iterator[str]:
    with running_server(_settings(tiny_checkpoint, admin_key=ADMIN, api_key="user-key")) as url:
        yield url


def test_model_management_is_off_without_an_admin_key(tiny_server: str) -> None:
    refused = httpx.post(tiny_server + LOAD, json={})
    assert refused.status_code == 404 and refused.json() == {"error": "Not Found"}
    assert "model_repository" not in httpx.get(tiny_server + "/v2").json()["extensions"]


def test_model_management_needs_the_admin_key(managed: str, tiny_checkpoint: Path) -> None:
    assert "model_repository" in httpx.get(managed + "/v2").json()["extensions"]
    for headers in ({}, {"X-API-Key": "user-key"}, {"Authorization": "Bearer wrong"}):
        refused = httpx.post(managed + LOAD, json={}, headers=headers)
        assert refused.status_code == 401 and refused.json() == {"error": "missing or invalid admin key"}, headers
    admin = {"Authorization": f"Bearer {ADMIN}"}
    version = httpx.get(managed + "/api/v1/model", headers={"X-API-Key": "user-key"}).json()["version"]
    index = httpx.post(managed + "/v2/repository/index", headers=admin)
    assert index.json() == [
        {"name": name, "version": version, "state": "READY", "reason": ""}
        for name in ("cat-breeds", "cat-breeds-pixels")  # one model, two inputs
    ]
    unknown = httpx.post(managed + "/v2/repository/models/dogs/load", json={}, headers=admin)
    assert unknown.status_code == 404 and "'dogs'" in unknown.json()["error"]
    garbled = httpx.post(managed + LOAD, content=b"{not json", headers=admin)
    assert garbled.status_code == 400 and "not JSON" in garbled.json()["error"]
    unload = httpx.post(managed + "/v2/repository/models/cat-breeds/unload", headers=admin)
    assert unload.status_code == 501 and "not supported" in unload.json()["error"]
    again = httpx.post(managed + LOAD, headers=admin, timeout=120)  # no body: the configured checkpoint again
    assert again.status_code == 200, again.text
    assert again.json()["version"] == again.json()["previous_version"] == version
    assert again.json()["checkpoint"] == str(tiny_checkpoint)


def test_body_limits_answer_in_the_v2_shape(tiny_server: str) -> None:
    too_big = httpx.post(tiny_server + "/v2/models/cat-breeds/infer", content=b"x" * (8 * 1024 * 1024))
    assert too_big.status_code == 413 and set(too_big.json()) == {"error"} and "exceeds" in too_big.json()["error"]
    assert httpx.get(tiny_server + "/v2/health/ready").status_code == 200
