"""Deployment files are code: every documented variable is used, and nothing secret is committed."""

from __future__ import annotations

import re
from pathlib import Path

from api.config import Settings

ROOT = Path(__file__).resolve().parents[2]
USERS = ["docker-compose.yml", "docker-compose.override.yml", "docker-compose.prod.yml", "docker-compose.cpu.yml"]


def _example_variables() -> set[str]:
    text = (ROOT / ".env.example").read_text()
    return set(re.findall(r"^#?\s?([A-Z][A-Z0-9_]+)=", text, flags=re.MULTILINE))


def _service_variables() -> set[str]:
    names = {f"API_{name.upper()}" for name in Settings.model_fields} | {"LOG_LEVEL", "WEB_CONCURRENCY"}
    return names - {"API_LOG_LEVEL", "API_WORKERS"}  # read from LOG_LEVEL and WEB_CONCURRENCY


def test_every_env_example_variable_is_used() -> None:
    compose_text = "\n".join((ROOT / name).read_text() for name in USERS)
    used_by_compose = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", compose_text))
    unused = _example_variables() - used_by_compose - _service_variables()
    assert not unused, f".env.example lists variables nothing reads: {sorted(unused)}"


def test_every_service_setting_and_compose_variable_is_documented() -> None:
    compose_text = "\n".join((ROOT / name).read_text() for name in USERS)
    used_by_compose = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", compose_text)) - {"PWD"}
    missing = (_service_variables() | used_by_compose) - _example_variables()
    assert not missing, f"variables missing from .env.example: {sorted(missing)}"


def test_compose_files_have_no_obsolete_version_key() -> None:
    for name in USERS:
        assert not re.search(r"^version:", (ROOT / name).read_text(), flags=re.MULTILINE), name
