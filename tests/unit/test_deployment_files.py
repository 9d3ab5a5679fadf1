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


def test_the_configuration_page_names_every_setting_and_no_other() -> None:
    """docs/configuration.md is the one table of settings: each `API_*` variable the service reads is
    a row there, and every row is a variable the service reads."""
    from api.config import REMOVED, environment_names

    page = (ROOT / "docs" / "configuration.md").read_text()
    rows = {  # every variable named in a row's first cell (`A` / `B` rows name two)
        name
        for line in re.findall(r"^\| (`[A-Z].*?) \|", page, flags=re.MULTILINE)
        for name in re.findall(r"`([A-Z][A-Z0-9_]+)", line)
    }
    read = (environment_names() - {"API_LOG_LEVEL", "API_WORKERS"}) | {"LOG_LEVEL", "WEB_CONCURRENCY"}
    assert read - rows == set(), f"settings missing from docs/configuration.md: {sorted(read - rows)}"
    assert rows - read == set(), f"docs/configuration.md lists what the service does not read: {sorted(rows - read)}"
    assert not set(REMOVED) & rows


def test_pre_commit_runs_what_make_lint_runs() -> None:
    """.pre-commit-config.yaml and `make lint` are one list of checks: the same commands, in order."""
    import yaml

    makefile = (ROOT / "Makefile").read_text()
    lint = re.search(r"^lint: .*\n((?:\t.*\n)+)", makefile, flags=re.MULTILINE)
    assert lint is not None
    make_commands = [line.strip().replace("$(BIN)/", ".venv/bin/") for line in lint.group(1).splitlines()]
    config = yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text())
    hooks = [hook for repo in config["repos"] for hook in repo["hooks"]]
    assert [hook["entry"] for hook in hooks] == make_commands
    assert all(hook["language"] == "system" and hook["pass_filenames"] is False for hook in hooks)


def test_compose_passes_every_setting_by_name_and_restates_no_default() -> None:
    """docker-compose.yml lists every setting the service reads (so one set in .env or the shell is
    never dropped on the way), and gives a value only to what the container itself decides."""
    from api.config import environment_names

    text = (ROOT / "docker-compose.yml").read_text()
    block = text[text.index("    environment:\n") : text.index("\n    volumes:\n")]
    entries = dict(re.findall(r"^      ([A-Z][A-Z0-9_]*):(.*)$", block, flags=re.MULTILINE))
    container = {"API_CACHE_DIR"}  # the cache volume's default (the image's home), never the host's
    missing = environment_names() - set(entries) - container - {"API_LOG_LEVEL", "API_WORKERS"}
    assert missing == set(), f"docker-compose.yml drops these settings: {sorted(missing)}"
    valued = {name for name, value in entries.items() if value.strip()}
    assert valued == {"API_CHECKPOINT_PATH", "API_HOST", "API_PORT", "API_LOG_DIR", "API_MODEL_REPOSITORY"}, valued
