"""The arithmetic of trust, alone: fold discovery, the ensemble head, temperature scaling and ECE."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from api.engine.model.ensemble import check_folds, ensemble_sha256
from api.engine.model.files.folds import fold_paths
from api.engine.model.measure.calibration import (
    calibrate,
    expected_calibration_error,
    fit_temperature,
    reliability,
    temper,
)
from api.engine.model.runtimes.base import Head
from api.errors import CheckpointMismatch, ConfigError


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_a_folder_of_folds_a_glob_and_a_pick(tmp_path: Path) -> None:
    for k in range(3):
        _touch(tmp_path / f"fold_{k}" / "best_model.pt")
        _touch(tmp_path / f"fold_{k}" / "last.pt")  # best_model.pt is preferred
    _touch(tmp_path / "notes" / "readme.txt")  # no checkpoint: not a fold
    expected = [(f"fold_{k}", tmp_path / f"fold_{k}" / "best_model.pt") for k in range(3)]
    assert fold_paths(tmp_path) == expected
    assert fold_paths(tmp_path / "fold_*" / "best_model.pt") == expected
    assert fold_paths(tmp_path, "fold_2, fold_0") == [expected[0], expected[2]]
    assert fold_paths(tmp_path / "fold_1" / "best_model.pt") == [("best_model", expected[1][1])]
    with pytest.raises(ConfigError, match="API_FOLDS=fold_9: no fold named fold_9"):
        fold_paths(tmp_path, "fold_9")
    with pytest.raises(ConfigError, match=r"API_FOLDS=fold_0 picks folds, but API_CHECKPOINT_PATH=.* names one"):
        fold_paths(tmp_path / "fold_1" / "best_model.pt", "fold_0")
    with pytest.raises(Exception, match="matches no file"):
        fold_paths(tmp_path / "fold_*" / "model.safetensors")


def test_a_fold_with_two_checkpoints_and_no_best_model_is_refused(tmp_path: Path) -> None:
    _touch(tmp_path / "fold_0" / "epoch_3.pt")
    _touch(tmp_path / "fold_0" / "epoch_4.pt")
    with pytest.raises(ConfigError, match=r"fold .*fold_0 holds 2 checkpoints .* keep one per fold"):
        fold_paths(tmp_path)


def test_a_timm_model_folder_stays_one_checkpoint(tmp_path: Path) -> None:
    _touch(tmp_path / "config.json")
    _touch(tmp_path / "model.safetensors")
    assert fold_paths(tmp_path) == [(tmp_path.name, tmp_path)]


def test_folds_must_agree_and_the_version_covers_them_all() -> None:
    same = {"class_names": ["a", "b"], "preprocessing": {"input_size": (3, 32, 32), "crop_pct": 0.875}}
    check_folds(["fold_0", "fold_1"], [same, same])
    other = {**same, "preprocessing": {"input_size": (3, 64, 64), "crop_pct": 0.875}}
    with pytest.raises(
        CheckpointMismatch, match=r"fold fold_1 differs from fold fold_0 in its preprocessing: input_size"
    ):
        check_folds(["fold_0", "fold_1"], [same, other])
    assert ensemble_sha256(["a" * 64]) == "a" * 64
    assert ensemble_sha256(["a" * 64, "b" * 64]) != ensemble_sha256(["b" * 64, "a" * 64])


def test_the_ensemble_head_answers_mean_then_spread_tempered() -> None:
    logits = torch.randn(4, 3, 5)  # N x k x C
    probabilities = logits.softmax(-1)
    head = Head((0.5,) * 3, (0.5,) * 3)
    out = head.scores(logits)
    assert out.shape == (4, 10)
    torch.testing.assert_close(out[:, :5], probabilities.mean(1))
    torch.testing.assert_close(out[:, 5:], torch.from_numpy(probabilities.numpy().std(1)))
    warm = Head((0.5,) * 3, (0.5,) * 3, temperature=2.0).scores(logits)
    np.testing.assert_allclose(warm[:, :5].numpy(), temper(probabilities.mean(1).numpy(), 2.0), atol=1e-6)
    torch.testing.assert_close(warm[:, 5:], out[:, 5:])  # the spread is the folds' own
    single = torch.randn(4, 5)
    torch.testing.assert_close(Head((0.5,) * 3, (0.5,) * 3, temperature=2.0).scores(single), (single / 2).softmax(-1))


def test_temperature_scaling_recovers_a_known_temperature_and_lowers_ece() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (4000, 10))
    truth = np.array([rng.choice(10, p=p) for p in temper(np.exp(logits) / np.exp(logits).sum(1, keepdims=True), 1.0)])
    overconfident = temper(np.exp(logits) / np.exp(logits).sum(1, keepdims=True), 1 / 2.5)  # as if T = 0.4
    fitted = fit_temperature(overconfident, truth)
    assert fitted == pytest.approx(2.5, rel=0.08)
    assert expected_calibration_error(temper(overconfident, fitted), truth) < expected_calibration_error(
        overconfident, truth
    )
    table = reliability(overconfident, truth)
    assert len(table) == 15 and sum(row["count"] for row in table) == 4000


def test_calibration_without_labels_or_with_a_pin() -> None:
    probabilities = np.full((10, 4), 0.25)
    assert calibrate(probabilities, None, fit=4, pinned=None).source == "none"
    pinned = calibrate(probabilities, None, fit=4, pinned=1.7)
    assert (pinned.source, pinned.temperature) == ("pinned", 1.7)
    labels = np.array([0, 1, 2, 3] * 2 + [0, 1])
    few = calibrate(probabilities, labels, fit=4, pinned=None)
    assert few.source == "none" and "only 4 labeled calibration images" in few.reason
    assert few.held_out_images == 6 and np.asarray(few.confusion).sum() == 6
