"""Turning scores into answers: top-k for softmax heads, every label over the threshold for sigmoid heads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from api.model import load_classifier
from tests.helpers import tiny_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ml") / "multi.pt"
    torch.save({"state_dict": tiny_model(num_classes=4).state_dict(), "class_names": ["a", "b", "c", "d"]}, path)
    return path


def test_single_label_ranks_top_k_of_a_softmax(checkpoint: Path) -> None:
    classifier = load_classifier(checkpoint, model_name="test_resnet", device="cpu")
    scores = torch.tensor([0.1, 0.6, 0.05, 0.25])
    assert classifier.rank(scores, 2) == [(1, "b", pytest.approx(0.6)), (3, "d", pytest.approx(0.25))]
    assert len(classifier.rank(scores, 99)) == 4  # top_k beyond the classes returns them all
    out = classifier.predict(torch.randn(3, 3, 160, 160))
    torch.testing.assert_close(out.sum(-1), torch.ones(3))


def test_multi_label_answers_every_label_over_the_threshold(checkpoint: Path) -> None:
    classifier = load_classifier(checkpoint, model_name="test_resnet", device="cpu", multi_label=True, threshold=0.3)
    scores = torch.tensor([0.9, 0.1, 0.35, 0.3])
    assert [name for _, name, _ in classifier.rank(scores, 1)] == ["a", "c", "d"]  # top_k does not cut
    out = classifier.predict(torch.randn(2, 3, 160, 160))
    assert ((out >= 0) & (out <= 1)).all()
    assert not torch.allclose(out.sum(-1), torch.ones(2))  # independent sigmoids, not a softmax
