"""Every checkpoint format loads the same weights; every broken checkpoint fails with a clear line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import safetensors.torch
import torch
from timm.models import save_for_hf

from api.errors import CheckpointMismatch, CheckpointNotFound, CheckpointUnreadable, ConfigError, UnsafeCheckpoint
from tests.helpers import eager_scores, load_model, tiny_model

NUM_CLASSES = 7


@pytest.fixture(scope="module")
def reference() -> torch.nn.Module:
    return tiny_model("test_resnet", NUM_CLASSES, seed=1)


@pytest.fixture(scope="module")
def probe() -> torch.Tensor:
    torch.manual_seed(123)
    return torch.randn(2, 3, 160, 160)


def _prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in state.items()}


def _writers() -> dict[str, Callable[[torch.nn.Module, Path], Path]]:
    def raw(model: torch.nn.Module, folder: Path) -> Path:
        torch.save(model.state_dict(), folder / "raw.pth")
        return folder / "raw.pth"

    def wrapped(key: str) -> Callable[[torch.nn.Module, Path], Path]:
        def write(model: torch.nn.Module, folder: Path) -> Path:
            path = folder / f"{key}.pt"
            torch.save({"epoch": 9, "best_acc": 0.91, key: model.state_dict()}, path)
            return path

        return write

    def ddp_prefix(model: torch.nn.Module, folder: Path) -> Path:
        torch.save({"state_dict": _prefixed(model.state_dict(), "module.")}, folder / "ddp.pt")
        return folder / "ddp.pt"

    def compiled_prefix(model: torch.nn.Module, folder: Path) -> Path:
        torch.save({"model": _prefixed(model.state_dict(), "_orig_mod.")}, folder / "compiled.pt")
        return folder / "compiled.pt"

    def timm_train(model: torch.nn.Module, folder: Path) -> Path:
        args = argparse.Namespace(model="test_resnet", num_classes=NUM_CLASSES, lr=0.1)
        torch.save({"arch": "test_resnet", "args": args, "state_dict": model.state_dict()}, folder / "timm.pth.tar")
        return folder / "timm.pth.tar"

    def safetensors_file(model: torch.nn.Module, folder: Path) -> Path:
        safetensors.torch.save_file(model.state_dict(), folder / "model.safetensors")
        return folder / "model.safetensors"

    def hf_folder(model: torch.nn.Module, folder: Path) -> Path:
        save_for_hf(model, str(folder / "export"), safe_serialization=True)
        return folder / "export"

    def torchscript(model: torch.nn.Module, folder: Path) -> Path:
        torch.jit.script(model).save(str(folder / "scripted.pt"))
        return folder / "scripted.pt"

    return {
        "raw_state_dict": raw,
        "model_state_dict": wrapped("model_state_dict"),
        "state_dict": wrapped("state_dict"),
        "model": wrapped("model"),
        "module_prefix": ddp_prefix,
        "orig_mod_prefix": compiled_prefix,
        "timm_train_checkpoint": timm_train,
        "safetensors": safetensors_file,
        "timm_folder": hf_folder,
        "torchscript": torchscript,
    }


@pytest.mark.parametrize("fmt", sorted(_writers()))
def test_each_format_loads_the_same_weights(
    fmt: str, reference: torch.nn.Module, probe: torch.Tensor, tmp_path: Path
) -> None:
    path = _writers()[fmt](reference, tmp_path)
    classifier = load_model(path, model_name="test_resnet", num_classes=NUM_CLASSES, device="cpu")
    with torch.inference_mode():
        expected = reference(probe).softmax(-1)
    assert classifier.num_classes == NUM_CLASSES
    assert classifier.architecture == "test_resnet"
    assert len(classifier.checkpoint.sha256) == 64
    torch.testing.assert_close(eager_scores(classifier, probe), expected, rtol=1e-4, atol=1e-5)


def test_ema_weights_are_preferred_and_can_be_declined(tmp_path: Path, probe: torch.Tensor) -> None:
    live, ema = tiny_model(num_classes=3, seed=1), tiny_model(num_classes=3, seed=2)
    path = tmp_path / "ema.pt"
    torch.save({"state_dict": live.state_dict(), "state_dict_ema": ema.state_dict()}, path)
    with torch.inference_mode():
        want_ema, want_live = ema(probe).softmax(-1), live(probe).softmax(-1)
    chosen = load_model(path, model_name="test_resnet", device="cpu")
    assert chosen.checkpoint.weights_key == "state_dict_ema"
    torch.testing.assert_close(eager_scores(chosen, probe), want_ema, rtol=1e-4, atol=1e-5)
    declined = load_model(path, model_name="test_resnet", device="cpu", use_ema=False)
    torch.testing.assert_close(eager_scores(declined, probe), want_live, rtol=1e-4, atol=1e-5)


def test_checkpoint_metadata_wins_over_settings(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = tiny_model("test_efficientnet", 4)
    path = tmp_path / "meta.pt"
    names = ["a", "b", "c", "d"]
    torch.save({"architecture": "test_efficientnet", "class_names": names, "state_dict": model.state_dict()}, path)
    classifier = load_model(path, model_name="resnet50", device="cpu")
    assert classifier.architecture == "test_efficientnet"
    assert list(classifier.class_names) == names and classifier.labels_source == "checkpoint"
    assert "API_MODEL_NAME=resnet50 ignored" in caplog.text


def test_unset_num_classes_follows_the_classifier_shape(tmp_path: Path) -> None:
    torch.save(tiny_model(num_classes=120).state_dict(), tmp_path / "dogs.pt")
    classifier = load_model(tmp_path / "dogs.pt", model_name="test_resnet", device="cpu")
    assert classifier.num_classes == 120
    assert list(classifier.class_names)[:2] == ["class_0", "class_1"]


def test_explicit_num_classes_conflict_names_both_numbers(tmp_path: Path) -> None:
    torch.save(tiny_model(num_classes=120).state_dict(), tmp_path / "dogs.pt")
    with pytest.raises(CheckpointMismatch) as caught:
        load_model(tmp_path / "dogs.pt", model_name="test_resnet", num_classes=67, device="cpu")
    message = str(caught.value)
    assert "API_NUM_CLASSES=67" in message and "120 classes" in message and "\n" not in message


def test_wrong_architecture_is_refused_with_the_fix(tmp_path: Path) -> None:
    torch.save(tiny_model("test_efficientnet", 5).state_dict(), tmp_path / "effnet.pt")
    with pytest.raises(CheckpointMismatch) as caught:
        load_model(tmp_path / "effnet.pt", model_name="test_resnet", num_classes=5, device="cpu")
    assert "does not fit architecture test_resnet" in str(caught.value)
    assert "API_MODEL_NAME" in str(caught.value)


def test_unknown_architecture_is_a_config_error(tmp_path: Path) -> None:
    torch.save(tiny_model().state_dict(), tmp_path / "m.pt")
    with pytest.raises(ConfigError, match="unknown architecture 'resnet_9000'"):
        load_model(tmp_path / "m.pt", model_name="resnet_9000", device="cpu")


@pytest.mark.parametrize("cached", [False, True])  # with a model cache, a CPU load looks for its snapshot first
def test_missing_checkpoint_names_path_and_how_to_mount(tmp_path: Path, cached: bool) -> None:
    missing = tmp_path / "outputs" / "best_model.pt"
    options = {"cache_dir": tmp_path / "cache", "runtime": "auto"} if cached else {}
    with pytest.raises(CheckpointNotFound) as caught:
        load_model(missing, device="cpu", **options)
    assert str(missing) in str(caught.value) and "/app/models" in str(caught.value)


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.95])
def test_truncated_checkpoint_is_unreadable(tmp_path: Path, keep: float) -> None:
    whole = tmp_path / "whole.pt"
    torch.save({"model_state_dict": tiny_model().state_dict()}, whole)
    data = whole.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointUnreadable, match=str(cut)):
        load_model(cut, model_name="test_resnet", device="cpu")


def test_garbage_and_non_weight_files_are_unreadable(tmp_path: Path) -> None:
    garbage = tmp_path / "notes.pt"
    garbage.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(CheckpointUnreadable):
        load_model(garbage, device="cpu")
    not_weights = tmp_path / "list.pt"
    torch.save([1, 2, 3], not_weights)
    with pytest.raises(CheckpointUnreadable, match="not a dict of weights"):
        load_model(not_weights, device="cpu")
    empty_folder = tmp_path / "folder"
    empty_folder.mkdir()
    with pytest.raises(CheckpointUnreadable, match="not a timm model folder"):
        load_model(empty_folder, device="cpu")


class _Exploit:
    """A pickle payload that would create a file if it were ever unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": tiny_model().state_dict(), "hook": _Exploit(marker)}, path)
    with pytest.raises(UnsafeCheckpoint) as caught:
        load_model(path, model_name="test_resnet", device="cpu")
    assert not marker.exists()
    assert "could run code" in str(caught.value) and "system" in str(caught.value)


def test_timm_folder_labels_and_preprocessing_come_from_config(tmp_path: Path) -> None:
    model = tiny_model(num_classes=3)
    save_for_hf(
        model,
        str(tmp_path / "export"),
        model_config={
            "label_names": ["n1", "n2", "n3"],
            "label_descriptions": {"n1": "one", "n2": "two", "n3": "three"},
        },
        data_config={"mean": (0.1, 0.2, 0.3), "std": (0.9, 0.8, 0.7), "input_size": (3, 96, 96)},
        safe_serialization=True,
    )
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["architecture"] == "test_resnet"
    classifier = load_model(tmp_path / "export", device="cpu")
    assert list(classifier.class_names) == ["one", "two", "three"]
    assert tuple(classifier.data_config["mean"]) == pytest.approx((0.1, 0.2, 0.3))
    assert tuple(classifier.data_config["input_size"]) == (3, 96, 96)


def test_the_served_snapshot_is_keyed_by_the_files_settings_and_code(tmp_path: Path) -> None:
    """A warm restart serves from the cache's snapshot only for the same checkpoint bytes, labels file
    and settings (api/engine/model/snapshot.py); PyTorch runtimes and torch.compile never use one."""
    from api.engine.model import snapshot
    from tests.helpers import model_settings

    checkpoint, labels = tmp_path / "best_model.pt", tmp_path / "classes.txt"
    checkpoint.write_bytes(b"weights")
    labels.write_text("a\nb\n")
    settings = model_settings(checkpoint, class_names_path=labels, cache_dir=tmp_path / "cache", runtime="auto")
    key = snapshot.key(settings, threads=2)
    assert key is not None and key == snapshot.key(settings, threads=2)
    assert snapshot.key(dataclasses.replace(settings, threshold=0.7), threads=2) != key
    assert snapshot.key(settings, threads=1) != key
    labels.write_text("a\nc\n")
    assert snapshot.key(settings, threads=2) != key
    labels.write_text("a\nb\n")
    checkpoint.write_bytes(b"other weights")
    assert snapshot.key(settings, threads=2) != key
    for other in ({"runtime": "torch"}, {"runtime": "null"}, {"compile": True}, {"cache_dir": None}):
        assert snapshot.key(dataclasses.replace(settings, **other), threads=2) is None
    os.mkfifo(tmp_path / "fifo.pt")  # no snapshot for what is no regular file: the full load refuses it
    for path in (tmp_path / "missing.pt", tmp_path / "fifo.pt"):
        assert snapshot.key(dataclasses.replace(settings, checkpoint_path=path), threads=2) is None
