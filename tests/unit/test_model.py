"""Turning scores into answers: top-k for softmax heads, every label over the threshold for sigmoid heads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from api.engine.model.runtimes.base import batch_buckets
from tests.helpers import load_model, random_pixels


def test_single_label_ranks_top_k_of_a_softmax(four_class_checkpoint: Path) -> None:
    classifier = load_model(four_class_checkpoint, model_name="test_resnet", device="cpu")
    scores = torch.tensor([0.1, 0.6, 0.05, 0.25])
    assert classifier.served.rank(scores.numpy(), 2) == [(1, "b", pytest.approx(0.6)), (3, "d", pytest.approx(0.25))]
    assert len(classifier.served.rank(scores.numpy(), 99)) == 4  # top_k beyond the classes returns them all
    out = classifier.forward(random_pixels(classifier, 3))
    torch.testing.assert_close(out.sum(-1), torch.ones(3))


def test_multi_label_answers_every_label_over_the_threshold(four_class_checkpoint: Path) -> None:
    classifier = load_model(
        four_class_checkpoint, model_name="test_resnet", device="cpu", multi_label=True, threshold=0.3
    )
    scores = torch.tensor([0.9, 0.1, 0.35, 0.3])
    assert [name for _, name, _ in classifier.served.rank(scores.numpy(), 1)] == ["a", "c", "d"]  # top_k does not cut
    out = classifier.forward(random_pixels(classifier, 2))
    assert ((out >= 0) & (out <= 1)).all()
    assert not torch.allclose(out.sum(-1), torch.ones(2))  # independent sigmoids, not a softmax


def test_batches_are_padded_to_powers_of_two_up_to_the_largest(four_class_checkpoint: Path) -> None:
    """The sizes a compiled (or CUDA) model sees, each warmed up before ready; tests/gpu covers CUDA."""
    assert batch_buckets(64) == (1, 2, 4, 8, 16, 32, 64)
    assert batch_buckets(12) == (1, 2, 4, 8, 12)
    assert batch_buckets(1) == (1,)
    assert (
        load_model(four_class_checkpoint, model_name="test_resnet", device="cpu", max_batch_size=8).runtime.padded_sizes
        == ()
    )
