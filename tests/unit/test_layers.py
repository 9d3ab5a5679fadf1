"""The layers: the engine imports no web framework; the HTTP side no server runner."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENGINE_MODULES = sorted(f"api.engine.{p.stem}" for p in (ROOT / "api" / "engine").glob("*.py") if p.stem != "__init__")


def _imported_after(modules: list[str]) -> set[str]:
    """Top-level packages in sys.modules after importing `modules` in a fresh interpreter."""
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "print('\\n'.join(sorted({m.split('.')[0] for m in sys.modules} | set(sys.modules))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    return set(out.split())


def test_there_is_an_engine_to_check() -> None:
    assert {"api.engine.service", "api.engine.loader", "api.engine.batching"} <= set(ENGINE_MODULES)


@pytest.mark.parametrize("framework", ["fastapi", "starlette", "uvicorn", "gunicorn", "api.http", "api.ops"])
def test_the_engine_imports_no_web_framework(framework: str) -> None:
    loaded = _imported_after(ENGINE_MODULES)
    assert "api.engine.service" in loaded  # the check saw the engine
    assert framework not in loaded, f"importing the engine pulls in {framework}"


def test_the_http_side_imports_no_server_runner() -> None:
    loaded = _imported_after(["api.http.app"])
    assert "fastapi" in loaded  # the check saw the app
    assert "api.ops" not in loaded and "gunicorn" not in loaded


def test_the_front_end_imports_no_torch() -> None:
    """What a front-end process imports (the app, its routes, the link to the engine) pulls in no
    torch, timm, torchvision or OpenVINO: only the engine process loads them."""
    code = (
        "import sys, api.main, api.http.app, api.engine.link, api.ops.server, api.ops.engine; "
        "api.main.create_app(api.main.get_settings()); "
        "print(sorted(m for m in ('torch', 'timm', 'torchvision', 'openvino') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
