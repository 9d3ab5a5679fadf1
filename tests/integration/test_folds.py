"""k folds served as one model, on real data: a 3-fold resnet10t trained on scikit-learn's digits
(tests/digits.py) and 360 held-out digits no fold saw. The answer is the folds' mean with its spread,
one forward pass serves all folds on every runtime, the ensemble is at least as accurate as its best
fold, and the temperature fitted on the labeled folder makes the held-out confidence honester."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from api.engine.model.classifier import Classifier
from api.engine.model.ensemble import FoldEnsemble
from api.engine.model.runtimes.openvino_runtime import OpenVINORuntime
from api.errors import CheckpointMismatch, ConfigError
from tests.digits import IMAGE_SIZE, Digits
from tests.helpers import load_model

CLASSES = 10


def _images(digits: Digits) -> list[Image.Image]:
    return [Image.fromarray(image).convert("RGB") for image in digits.images]


def _rows(classifier: Classifier, images: list[Image.Image]) -> np.ndarray:
    prepared = [classifier.prepare(image) for image in images]
    return np.concatenate([classifier.forward(prepared[i : i + 32]).numpy() for i in range(0, len(prepared), 32)])


@pytest.fixture(scope="module")
def alone(digits: Digits) -> list[np.ndarray]:
    """Each fold's own scores on the held-out digits, each served alone (PyTorch fp32)."""
    folds = sorted(digits.folds.iterdir())
    return [_rows(load_model(f / "best_model.pt", image_size=IMAGE_SIZE), _images(digits)) for f in folds]


def test_the_answer_is_the_folds_mean_and_its_spread_their_standard_deviation(
    digits: Digits, alone: list[np.ndarray]
) -> None:
    ensemble = load_model(digits.folds, image_size=IMAGE_SIZE)
    assert isinstance(ensemble.runtime.model, FoldEnsemble)  # type: ignore[attr-defined]
    rows = _rows(ensemble, _images(digits))
    assert rows.shape == (len(digits.labels), 2 * CLASSES)
    stacked = np.stack(alone, axis=1)  # N x k x C
    np.testing.assert_allclose(rows[:, :CLASSES], stacked.mean(axis=1), atol=1e-3)
    np.testing.assert_allclose(rows[:, CLASSES:], stacked.std(axis=1), atol=1e-3)
    assert rows[:, CLASSES:].max() > 0.01  # the folds do disagree somewhere: the spread is not zeros

    served, described = ensemble.served, ensemble.describe()
    assert served.folds == 3 and served.width == 2 * CLASSES and described["fold_count"] == 3
    digests = [f["sha256"] for f in described["folds"]]
    assert [f["name"] for f in described["folds"]] == ["fold_0", "fold_1", "fold_2"]
    for fold in described["folds"]:
        assert fold["sha256"] == hashlib.sha256(Path(fold["path"]).read_bytes()).hexdigest()
        assert fold["recorded_score"]["key"] == "best_metric" and 0.5 < fold["recorded_score"]["value"] <= 1
    assert served.checkpoint_sha256 == hashlib.sha256("\n".join(digests).encode()).hexdigest()
    assert described["checkpoint_path"] == str(digits.folds.resolve())


def test_the_ensemble_is_at_least_as_accurate_as_its_best_fold(digits: Digits, alone: list[np.ndarray]) -> None:
    folds = [float(np.mean(scores.argmax(1) == digits.labels)) for scores in alone]
    ensemble = float(np.mean(np.mean(alone, axis=0).argmax(1) == digits.labels))
    print(f"digits, 360 held out: folds alone {folds}, ensemble {ensemble}")
    assert ensemble >= max(folds)
    assert min(folds) > 0.5  # real models of real digits, far from chance (0.1)


def test_openvino_runs_all_folds_in_one_inference_call(digits: Digits, alone: list[np.ndarray]) -> None:
    ensemble = load_model(digits.folds, image_size=IMAGE_SIZE, runtime="openvino")
    runtime = ensemble.runtime
    assert isinstance(runtime, OpenVINORuntime)
    (output,) = runtime.compiled.outputs  # one graph, one output: N x k x C
    assert output.get_partial_shape()[1].get_length() == 3 and output.get_partial_shape()[2].get_length() == CLASSES
    rows = _rows(ensemble, _images(digits))
    np.testing.assert_allclose(rows[:, :CLASSES], np.mean(alone, axis=0), atol=1e-3)


def test_a_glob_and_api_folds_pick_folds_and_a_differing_fold_stops_the_load(
    digits: Digits, alone: list[np.ndarray], tmp_path: Path
) -> None:
    glob = load_model(digits.folds / "fold_*" / "best_model.pt", image_size=IMAGE_SIZE, folds="fold_0,fold_2")
    assert [f.name for f in glob.folds] == ["fold_0", "fold_2"]
    rows = _rows(glob, _images(digits)[:40])
    np.testing.assert_allclose(rows[:, :CLASSES], (alone[0][:40] + alone[2][:40]) / 2, atol=1e-3)

    with pytest.raises(ConfigError, match=r"API_FOLDS=fold_7: no fold named fold_7 .* fold_0, fold_1, fold_2"):
        load_model(digits.folds, image_size=IMAGE_SIZE, folds="fold_7")

    odd = tmp_path / "folds"
    shutil.copytree(digits.folds, odd)
    ckpt = torch.load(odd / "fold_1" / "best_model.pt", weights_only=True)
    ckpt["class_names"] = [*ckpt["class_names"][:9], "nine"]
    torch.save(ckpt, odd / "fold_1" / "best_model.pt")
    with pytest.raises(CheckpointMismatch, match="fold fold_1 differs from fold fold_0 in its class names: label 9"):
        load_model(odd, image_size=IMAGE_SIZE)


def test_a_temperature_fitted_on_the_labeled_folder_lowers_the_held_out_calibration_error(
    digits: Digits, alone: list[np.ndarray], tmp_path: Path
) -> None:
    calibrated = load_model(digits.folds, image_size=IMAGE_SIZE, eval_dir=digits.eval_dir, cache_dir=tmp_path)
    calibration = calibrated.describe()["calibration"]
    assert calibration["source"] == "fitted" and calibration["temperature"] != 1.0
    held = calibration["held_out_images"]
    assert calibration["fit_images"] + held == len(digits.labels) and held >= 100
    print(
        f"digits: T={calibration['temperature']}, ECE {calibration['ece_before']} -> {calibration['ece_after']}, "
        f"NLL {calibration['nll_before']} -> {calibration['nll_after']}, accuracy {calibration['accuracy']}, "
        f"folds alone {calibration['fold_accuracy']}"
    )
    assert calibration["ece_after"] <= calibration["ece_before"]
    assert sum(b["count"] for b in calibration["reliability_after"]) == held
    assert np.asarray(calibration["confusion"]).sum() == held and np.trace(calibration["confusion"]) >= 0.9 * held
    assert len(calibration["fold_accuracy"]) == 3

    # every served score is the folds' mean, tempered: softmax(log p / T); top-1 answers unchanged
    rows = _rows(calibrated, _images(digits))
    mean = np.mean(alone, axis=0)
    tempered = np.exp(np.log(np.clip(mean, 1e-12, None)) / calibration["temperature"])
    tempered /= tempered.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(rows[:, :CLASSES], tempered, atol=1e-3)
    assert (rows[:, :CLASSES].argmax(1) == mean.argmax(1)).all()

    pinned = load_model(digits.folds, image_size=IMAGE_SIZE, temperature=2.0)
    assert pinned.describe()["calibration"]["source"] == "pinned"
    softer = _rows(pinned, _images(digits)[:20])[:, :CLASSES]
    expected = np.sqrt(np.clip(mean[:20], 1e-12, None))  # T = 2: p^(1/2), renormalised
    np.testing.assert_allclose(softer, expected / expected.sum(axis=1, keepdims=True), atol=1e-3)


def test_explain_uses_the_deepest_fitting_stage_or_the_named_layer(digits: Digits) -> None:
    from api.engine.model.explain import load_explainer
    from tests.helpers import model_settings

    pixels = np.asarray(Image.fromarray(digits.images[0]).convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE)))
    settings = model_settings(digits.folds, image_size=IMAGE_SIZE)
    default = load_explainer(settings).explain(pixels, int(digits.labels[0]))
    assert default.layer == "layer1"  # 32 px: layer1's maps are 8 x 8, layer2's 4 x 4
    assert default.values.shape == (IMAGE_SIZE, IMAGE_SIZE) and 0 < default.values.max() <= 1
    named = load_explainer(dataclasses.replace(settings, explain_layer="act1")).explain(pixels, 0)
    assert named.layer == "act1"
    with pytest.raises(ConfigError, match=r"API_EXPLAIN_LAYER=head: the model has no such module; .* act1, layer1"):
        load_explainer(dataclasses.replace(settings, explain_layer="head"))
