"""The layers: api.engine <- api.remote <- api.http <- api.ops, checked on real imports in fresh
interpreters; the front-end half of the engine boundary imports no torch; the processes the service
starts by module name are named in one place and exist."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

from api.remote import entrypoints

ROOT = Path(__file__).resolve().parents[2]


def _modules(package: str) -> list[str]:
    folder = ROOT / Path(*package.split("."))
    found = []
    for path in sorted(folder.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return found


LAYERS = {
    "engine": _modules("api.engine"),
    "remote": _modules("api.remote"),
    "frontend": [*_modules("api.remote.frontend"), "api.remote.messages", "api.remote.wire"],
    "host": _modules("api.remote.host"),
    "http": _modules("api.http"),
}
HEAVY = ("torch", "timm", "torchvision", "openvino")


@cache
def _imports() -> dict[str, list[str]]:
    """For each layer, every module in sys.modules after importing it, in one fresh interpreter per
    layer (a layer's imports must not be hidden by another's), all started at once."""
    code = (
        "import importlib, json, sys\n"
        "for name in sys.argv[1:]: importlib.import_module(name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    runs = {
        layer: subprocess.Popen([sys.executable, "-c", code, *modules], stdout=subprocess.PIPE, text=True, cwd=ROOT)
        for layer, modules in LAYERS.items()
    }
    found = {}
    for layer, run in runs.items():
        out, _ = run.communicate(timeout=300)
        assert run.returncode == 0, f"importing the {layer} layer failed"
        found[layer] = json.loads(out)
    return found


def _loaded(layer: str) -> set[str]:
    names = set(_imports()[layer])
    return names | {name.split(".")[0] for name in names}


def test_there_is_something_to_check() -> None:
    assert {"api.engine.service", "api.engine.loader", "api.engine.batching"} <= set(LAYERS["engine"])
    assert {"api.remote.host.host", "api.remote.host.swapper", "api.remote.frontend.link"} <= set(LAYERS["remote"])


@pytest.mark.parametrize(
    "outside", ["api.remote", "api.http", "api.ops", "fastapi", "starlette", "uvicorn", "gunicorn"]
)
def test_the_engine_imports_nothing_above_it(outside: str) -> None:
    loaded = _loaded("engine")
    assert "api.engine.service" in loaded  # the check saw the engine
    assert outside not in loaded, f"importing the engine pulls in {outside}"


@pytest.mark.parametrize("outside", ["api.http", "api.ops", "fastapi", "starlette", "uvicorn", "gunicorn"])
def test_the_engine_boundary_imports_no_web_side(outside: str) -> None:
    loaded = _loaded("remote")
    assert "api.remote.host.host" in loaded
    assert outside not in loaded, f"importing api.remote pulls in {outside}"


def test_the_front_end_half_of_the_boundary_imports_no_torch() -> None:
    loaded = _loaded("frontend")
    assert "api.remote.frontend.link" in loaded
    assert [name for name in HEAVY if name in loaded] == []
    assert "api.remote.host" not in loaded


def test_the_engine_half_of_the_boundary_needs_nothing_of_the_front_end_half() -> None:
    loaded = _loaded("host")
    assert "api.remote.host.host" in loaded and "torch" in loaded  # the check saw the engine half
    assert "api.remote.frontend" not in loaded


def test_the_http_side_imports_no_server_runner() -> None:
    loaded = _loaded("http")
    assert "fastapi" in loaded  # the check saw the app
    assert "api.ops" not in loaded and "gunicorn" not in loaded


def test_the_front_end_imports_no_torch() -> None:
    """What a front-end process runs (the app built from settings, its routes, the link to the engine)
    pulls in no torch, timm, torchvision or OpenVINO: only the engine process loads them."""
    code = (
        "import sys, api.main, api.ops.server, api.remote.frontend.supervisor; "
        "api.main.create_app(api.main.get_settings()); "
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("module", entrypoints.MODULES)
def test_every_process_entry_point_exists_and_runs_as_a_module(module: str) -> None:
    path = ROOT / Path(*module.split(".")).with_suffix(".py")
    tree = ast.parse(path.read_text())
    assert any(isinstance(node, ast.FunctionDef) and node.name == "main" for node in tree.body), module
    assert 'if __name__ == "__main__":' in path.read_text(), f"{module} cannot run as python -m"
    assert module.startswith("api.remote.host.")  # the engine half: it may import torch


def test_processes_are_started_only_through_the_named_entry_points() -> None:
    """No module names a process's module in a string of its own: they all use api.remote.entrypoints."""
    offenders = []
    for path in sorted((ROOT / "api").rglob("*.py")):
        if path.name == "entrypoints.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.strip() == "-m":
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} passes -m itself")
            if isinstance(node, ast.Constant) and node.value in entrypoints.MODULES:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} names {node.value}")
    assert offenders == []
