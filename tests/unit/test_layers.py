"""The layers, read from every module's imports (one parse, no interpreter per layer):

    api.engine (model, images <- serving) <- api.remote <- api.http <- api.ops

The engine imports nothing above it; images and the model import nothing of serving; config imports
no engine module; the front-end half of the engine boundary loads no torch; the processes the
service starts by module name are named in one place and exist. An import inside a function counts
for the layering (it runs when called) but not for what loading a module pulls in; imports under
`if TYPE_CHECKING:` count for neither. One real interpreter checks the front-end's imports as run.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pytest

from api.remote import entrypoints

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "timm", "torchvision", "openvino")
WEB = ("fastapi", "starlette", "uvicorn", "gunicorn")


@dataclass
class Imports:
    eager: set[str] = field(default_factory=set)  # run when the module loads
    deferred: set[str] = field(default_factory=set)  # inside functions: run when called


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _targets(node: ast.Import | ast.ImportFrom, here: str, modules: set[str]) -> set[str]:
    """What an import statement loads: the api modules it names (a name that is a module counts as
    that module), and the top-level package of anything else."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative: from the module's package
            package = (
                here.split(".")[: -node.level] if not (ROOT / Path(*here.split("."))).is_dir() else here.split(".")
            )
            base = ".".join([*package[: len(package) - node.level + 1], *([base] if base else [])])
        names = [base] + [f"{base}.{alias.name}" for alias in node.names]
    found = set()
    for name in names:
        if name.split(".")[0] != "api":
            found.add(name.split(".")[0])
        elif name in modules:
            found.add(name)
    return found


@cache
def _graph() -> dict[str, Imports]:
    paths = sorted((ROOT / "api").rglob("*.py"))
    modules = {_module_name(path) for path in paths}
    graph: dict[str, Imports] = {}
    for path in paths:
        name = _module_name(path)
        imports = graph[name] = Imports()
        # a package's parent packages load with it
        parts = name.split(".")
        imports.eager.update(".".join(parts[:i]) for i in range(1, len(parts)))

        def visit(node: ast.AST, deferred: bool, name: str = name, imports: Imports = imports) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and _is_type_checking(child):
                    for other in child.orelse:
                        visit(other, deferred)
                    continue
                if isinstance(child, ast.Import | ast.ImportFrom):
                    (imports.deferred if deferred else imports.eager).update(_targets(child, name, modules))
                inner = deferred or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
                visit(child, inner)

        visit(ast.parse(path.read_text()), False)
    return graph


def _reached(start: list[str], *, deferred: bool) -> set[str]:
    """Every module and package `start` loads: eagerly, or also through imports inside functions."""
    graph, seen, todo = _graph(), set(), list(start)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in graph:
            todo.extend(graph[name].eager | (graph[name].deferred if deferred else set()))
    return seen


def _package(prefix: str) -> list[str]:
    return [name for name in _graph() if name == prefix or name.startswith(prefix + ".")]


def _within(reached: set[str], prefix: str) -> list[str]:
    return sorted(name for name in reached if name == prefix or name.startswith(prefix + "."))


def test_the_reading_of_imports_sees_real_edges() -> None:
    """The oracle: edges known to exist are found, eager and deferred apart."""
    graph = _graph()
    assert "torch" in graph["api.engine.serving.service"].eager
    assert "api.engine.model.loader" in graph["api.engine.serving.service"].eager
    assert "fastapi" in graph["api.http.app"].eager
    assert "api.remote.frontend.supervisor" in graph["api.http.app"].deferred
    assert "api.remote.frontend.link" not in graph["api.http.routes.v2"].eager  # under TYPE_CHECKING only
    assert {"api.engine.model.loader", "api.engine.serving.batching"} <= set(_package("api.engine"))
    assert "torch" in _reached(["api.remote.host.host"], deferred=False)


@pytest.mark.parametrize("outside", ["api.remote", "api.http", "api.ops", "api.cli", "api.main", *WEB])
def test_the_engine_imports_nothing_above_it(outside: str) -> None:
    assert _within(_reached(_package("api.engine"), deferred=True), outside) == []


@pytest.mark.parametrize("room", ["api.engine.model", "api.engine.images"])
def test_the_model_and_images_import_no_serving_code(room: str) -> None:
    assert _within(_reached(_package(room), deferred=True), "api.engine.serving") == []


def test_images_need_no_torch_where_front_ends_decode() -> None:
    front = ["api.engine.images.decode", "api.engine.images.budget", "api.engine.images.recipe"]
    assert [name for name in HEAVY if name in _reached(front, deferred=False)] == []


def test_config_imports_no_engine_module() -> None:
    assert _within(_reached(["api.config"], deferred=True), "api.engine") == []


@pytest.mark.parametrize("outside", ["api.http", "api.ops", "api.cli", "api.main", *WEB])
def test_the_engine_boundary_imports_no_web_side(outside: str) -> None:
    assert _within(_reached(_package("api.remote"), deferred=True), outside) == []


def test_the_front_end_half_of_the_boundary_loads_no_torch_and_nothing_of_the_engine_half() -> None:
    front = [*_package("api.remote.frontend"), "api.remote.messages", "api.remote.wire"]
    loaded = _reached(front, deferred=False)
    assert "api.remote.frontend.link" in loaded
    assert [name for name in HEAVY if name in loaded] == []
    assert _within(_reached(front, deferred=True), "api.remote.host") == []


def test_the_engine_half_of_the_boundary_needs_nothing_of_the_front_end_half() -> None:
    assert _within(_reached(_package("api.remote.host"), deferred=True), "api.remote.frontend") == []


def test_the_http_side_imports_no_server_runner() -> None:
    reached = _reached(_package("api.http"), deferred=True)
    assert "fastapi" in reached
    assert _within(reached, "api.ops") == [] and "gunicorn" not in reached


def test_the_engine_has_rooms() -> None:
    """At most ten modules at api/engine's top; the rest live in its rooms."""
    top = [path.name for path in (ROOT / "api" / "engine").glob("*.py")]
    assert len(top) <= 10, top
    assert {"model", "images", "serving"} <= {path.name for path in (ROOT / "api" / "engine").iterdir()}


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
