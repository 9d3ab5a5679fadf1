"""The try-it page is served by the app itself (no CDN), and a setting turns it off."""

from __future__ import annotations

import re
from pathlib import Path

import httpx

from tests.helpers import make_settings, running_server


def test_page_and_its_assets_come_from_the_service(tiny_server: str) -> None:
    page = httpx.get(tiny_server + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assets = re.findall(r'(?:src|href)="(static/[^"]+)"', page.text)
    assert sorted(assets) == ["static/app.js", "static/style.css"]
    for asset in assets:
        response = httpx.get(f"{tiny_server}/{asset}")
        assert response.status_code == 200 and response.content
    # nothing from elsewhere: no absolute URLs in the page or its script
    script = httpx.get(tiny_server + "/static/app.js").text
    assert "http://" not in page.text + script and "https://" not in page.text + script
    assert '"api/v1/predict"' in script  # the public API, relative to wherever the service is mounted


def test_web_ui_off_leaves_the_api(tiny_checkpoint: Path) -> None:
    settings = make_settings(checkpoint_path=tiny_checkpoint, model_name="test_resnet", web_ui=False)
    with running_server(settings) as url:
        assert httpx.get(url + "/").status_code == 404
        assert httpx.get(url + "/static/app.js").status_code == 404
        assert httpx.get(url + "/health").status_code == 200
