"""One error tree: every code a response can carry is a class in api/errors.py, drawn in its tree."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import api
from api import errors
from api.errors import RequestError

PACKAGE = Path(api.__file__).parent


def _request_errors() -> list[type[RequestError]]:
    found, todo = [], [RequestError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return [cls for cls in found if cls is not RequestError]


def test_every_request_error_has_its_own_code_and_is_drawn_in_the_tree() -> None:
    classes = _request_errors()
    codes = [cls.code for cls in classes]
    assert len(codes) == len(set(codes)), f"two classes share a code: {sorted(codes)}"
    tree = errors.__doc__ or ""
    for cls in classes:
        assert cls.__module__ == "api.errors", f"{cls.__name__} is declared outside the tree ({cls.__module__})"
        status = "4xx" if cls is errors.HttpError else str(cls.status)
        line = rf"[├└]── {cls.__name__}\s+{status} {cls.code}\b"
        assert re.search(line, tree), f"{cls.__name__} ({status} {cls.code}) is not drawn in api/errors.py's tree"


def _literal_codes(tree: ast.AST) -> list[tuple[int, str]]:
    """String literals given as an error code: `code="..."`, `code = "..."` and `{"code": "..."}`."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "code" and isinstance(node.value, ast.Constant):
            found.append((node.value.lineno, node.value.value))
        elif (
            isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
        ):
            if any(isinstance(t, ast.Name) and t.id == "code" for t in node.targets):
                found.append((node.lineno, node.value.value))
        elif isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values, strict=True):
                if isinstance(key, ast.Constant) and key.value == "code" and isinstance(value, ast.Constant):
                    found.append((value.lineno, value.value))
    return found


def test_no_module_makes_up_a_code_outside_the_tree() -> None:
    """Codes come from the classes (`SomeError.code`), never a literal elsewhere: a literal that is
    not a class attribute of api/errors.py would be a code the tree does not declare."""
    strays = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "errors.py" and path.parent == PACKAGE:
            continue
        for line, code in _literal_codes(ast.parse(path.read_text())):
            strays.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {code!r}")
    assert not strays, "error codes written outside api/errors.py:\n" + "\n".join(strays)
    # the oracle itself: it sees a literal code where there is one
    assert sorted(_literal_codes(ast.parse('raise X("m", code="made_up")\nbody = {"code": "other"}'))) == [
        (1, "made_up"),
        (2, "other"),
    ]
