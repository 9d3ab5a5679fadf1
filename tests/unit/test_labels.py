"""Class names come from the checkpoint, a labels file, the 67 breeds, or class_N, in that order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from api.engine.model.files.labels import CAT_BREEDS, resolve_class_names
from api.errors import CheckpointMismatch, CheckpointUnreadable
from tests.helpers import load_model, tiny_model


def test_cat_breeds_are_the_67_imagefolder_names() -> None:
    assert len(CAT_BREEDS) == 67 == len(set(CAT_BREEDS))
    assert list(CAT_BREEDS) == sorted(CAT_BREEDS)  # ImageFolder indexes classes by sorted folder name
    assert CAT_BREEDS[0] == "Abyssinian" and CAT_BREEDS[-1] == "York Chocolate"


def test_67_outputs_without_labels_use_breeds_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ckpt = tmp_path / "best_model.pt"
    names, source = resolve_class_names(67, from_checkpoint=None, labels_path=None, checkpoint_path=ckpt)
    assert names == list(CAT_BREEDS) and source == "cat-breeds-dataset"
    assert "answers are wrong unless training used that order" in caplog.text


def test_other_counts_without_labels_are_generated(tmp_path: Path) -> None:
    names, source = resolve_class_names(3, from_checkpoint=None, labels_path=None, checkpoint_path=tmp_path / "m.pt")
    assert names == ["class_0", "class_1", "class_2"] and source == "generated"


@pytest.mark.parametrize(
    ("filename", "content"),
    [
        ("classes.txt", "cat\ndog\n\nbird\n"),
        ("classes.json", json.dumps(["cat", "dog", "bird"])),
        ("classes.json", json.dumps({"0": "cat", "1": "dog", "2": "bird"})),  # idx_to_class
        ("classes.json", json.dumps({"dog": 1, "bird": 2, "cat": 0})),  # class_to_idx
    ],
)
def test_labels_file_beside_checkpoint(tmp_path: Path, filename: str, content: str) -> None:
    (tmp_path / filename).write_text(content)
    names, source = resolve_class_names(
        3, from_checkpoint=None, labels_path=None, checkpoint_path=tmp_path / "best_model.pt"
    )
    assert names == ["cat", "dog", "bird"]
    assert source.endswith(filename)


def test_explicit_labels_path_wins_over_beside(tmp_path: Path) -> None:
    (tmp_path / "classes.txt").write_text("x\ny\n")
    chosen = tmp_path / "mine.txt"
    chosen.write_text("a\nb\n")
    names, _ = resolve_class_names(2, from_checkpoint=None, labels_path=chosen, checkpoint_path=tmp_path / "m.pt")
    assert names == ["a", "b"]


def test_checkpoint_names_win_over_files(tmp_path: Path) -> None:
    (tmp_path / "classes.txt").write_text("x\ny\n")
    names, source = resolve_class_names(
        2, from_checkpoint=["a", "b"], labels_path=None, checkpoint_path=tmp_path / "m.pt"
    )
    assert (names, source) == (["a", "b"], "checkpoint")


def test_label_count_mismatch_names_both_numbers(tmp_path: Path) -> None:
    (tmp_path / "classes.txt").write_text("\n".join(CAT_BREEDS[:66]))
    with pytest.raises(CheckpointMismatch, match=r"66 class names .* 67 outputs"):
        resolve_class_names(67, from_checkpoint=None, labels_path=None, checkpoint_path=tmp_path / "m.pt")


def test_missing_explicit_labels_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointUnreadable, match="API_CLASS_NAMES_PATH"):
        resolve_class_names(2, from_checkpoint=None, labels_path=tmp_path / "nope.json", checkpoint_path=tmp_path)


def test_class_to_idx_in_checkpoint_is_used_by_the_loader(tmp_path: Path) -> None:
    model = tiny_model(num_classes=2)
    torch.save({"state_dict": model.state_dict(), "class_to_idx": {"tabby": 1, "siamese": 0}}, tmp_path / "c.pt")
    classifier = load_model(tmp_path / "c.pt", model_name="test_resnet", device="cpu")
    assert list(classifier.class_names) == ["siamese", "tabby"]
