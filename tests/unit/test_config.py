"""Settings: precedence is tested, not assumed; bad values stop start-up with one clear line."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from api.config import Settings, load_settings
from api.errors import ConfigError


def test_defaults_outside_containers() -> None:
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.host == "127.0.0.1"
    assert settings.port == 8000
    assert settings.device == "auto"
    assert settings.cors_origins == []
    # Unset model settings defer to the checkpoint (then resnet50 / 67 classes / the architecture's size).
    assert settings.checkpoint_path is None
    assert settings.model_name is None and settings.num_classes is None and settings.image_size is None


def test_precedence_arguments_then_environment_then_dotenv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text("API_PORT=9001\nAPI_NUM_CLASSES=10\nAPI_MODEL_NAME=convnext_base\nLOG_LEVEL=debug\n")
    from_file = Settings(_env_file=dotenv)  # type: ignore[call-arg]
    assert (from_file.port, from_file.num_classes, from_file.model_name) == (9001, 10, "convnext_base")
    assert from_file.log_level == "DEBUG"

    monkeypatch.setenv("API_PORT", "9002")
    monkeypatch.setenv("LOG_LEVEL", "warning")
    from_env = Settings(_env_file=dotenv)  # type: ignore[call-arg]
    assert from_env.port == 9002  # environment beats .env
    assert from_env.num_classes == 10  # .env still fills what the environment leaves unset
    assert from_env.log_level == "WARNING"

    explicit = Settings(_env_file=dotenv, port=9003)  # type: ignore[call-arg]
    assert explicit.port == 9003  # arguments beat both


def test_dotenv_in_working_directory_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".env").write_text("API_TOP_K=3\n")
    monkeypatch.chdir(tmp_path)
    assert load_settings().top_k == 3


def test_cors_origins_are_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("API_CORS_ORIGINS", "http://localhost:3000, http://localhost:8080,")
    assert load_settings().cors_origins == ["http://localhost:3000", "http://localhost:8080"]


def test_blank_checkpoint_path_means_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("API_CHECKPOINT_PATH", "")
    assert load_settings().checkpoint_path is None


@pytest.mark.parametrize(
    ("variable", "value", "accepted"),
    [
        ("API_DEVICE", "gpu", "auto, cpu, cuda, cuda:N, mps"),
        ("API_PORT", "70000", "less than or equal to 65535"),
        ("API_PORT", "eighty", "valid integer"),
        ("API_NUM_CLASSES", "0", "greater than or equal to 1"),
        ("API_THRESHOLD", "1.5", "less than 1"),
        ("API_MULTI_LABEL", "maybe", "valid boolean"),
        ("LOG_LEVEL", "LOUD", "'CRITICAL', 'ERROR', 'WARNING', 'INFO' or 'DEBUG'"),
        ("API_MAX_UPLOAD_MB", "-1", "greater than 0"),
    ],
)
def test_bad_values_give_one_line_naming_variable_value_and_accepted(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, accepted: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{variable}={value!r} is invalid")
    assert accepted in message


def test_device_spellings(monkeypatch: pytest.MonkeyPatch) -> None:
    for value, expected in [("CUDA:1", "cuda:1"), (" cpu ", "cpu"), ("mps", "mps")]:
        monkeypatch.setenv("API_DEVICE", value)
        assert load_settings().device == expected


def test_blank_api_key_means_no_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compose passes API_API_KEY= when .env leaves it unset: that must not demand an empty key."""
    monkeypatch.setenv("API_API_KEY", "")
    assert load_settings().api_key is None
    monkeypatch.setenv("API_API_KEY", "abc")
    assert load_settings().api_key.get_secret_value() == "abc"  # type: ignore[union-attr]


def test_api_key_from_a_mounted_secret_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "API_API_KEY"
    secret.write_text("from-the-secret\n")
    monkeypatch.setenv("API_API_KEY_FILE", str(secret))
    assert load_settings().api_key.get_secret_value() == "from-the-secret"  # type: ignore[union-attr]
    monkeypatch.setenv("API_API_KEY_FILE", str(tmp_path / "missing"))
    with pytest.raises(
        ConfigError, match=r"API_API_KEY_FILE='.*missing' is invalid: cannot read it .*mount the secret"
    ):
        load_settings()
    monkeypatch.setenv("API_API_KEY_FILE", str(secret))
    monkeypatch.setenv("API_API_KEY", "also-set")
    with pytest.raises(ConfigError, match="API_API_KEY and API_API_KEY_FILE are both set; keep one"):
        load_settings()


def test_a_removed_setting_stops_start_up_naming_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_settings().port == 8000  # not set anywhere: starts
    (tmp_path / ".env").write_text("API_INFERENCE=process\n")  # in .env, as most operators set things
    with pytest.raises(ConfigError, match=r"^API_INFERENCE='process' is no longer a setting"):
        load_settings()
    monkeypatch.setenv("API_INFERENCE", "inprocess")  # the environment wins, as for every setting
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    assert "\n" not in message and message.startswith("API_INFERENCE='inprocess' is no longer a setting")
    assert "engine process" in message and "unset it" in message


DERIVED = {"max_batch_wait_s", "max_upload_bytes"}  # converted units; everything else keeps its setting's name


@pytest.mark.parametrize("group", ["model_group", "batching_group", "http_group", "process_group"])
def test_each_group_takes_its_values_from_the_settings_and_restates_no_default(group: str) -> None:
    """One source of truth: a group's fields have no defaults of their own (a missing one is a
    TypeError, not a silent second default), and each is filled from the setting of its name."""
    settings = Settings(_env_file=None, max_batch_size=3, max_queue=7, port=8123, top_k=2)  # type: ignore[call-arg]
    built = getattr(settings, group)
    for item in dataclasses.fields(built):
        assert item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING, item.name
        if item.name in DERIVED:
            continue
        assert item.name in Settings.model_fields, f"{group}.{item.name} has no setting of its name"
        expected = getattr(settings, item.name)
        if item.name == "cache_dir":
            continue  # derived: the default folder when unset
        value = getattr(built, item.name)
        assert value == (tuple(expected) if isinstance(value, tuple) else expected), item.name
    with pytest.raises(TypeError):
        type(built)()
