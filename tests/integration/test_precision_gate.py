"""Precision by measurement, with the demo's real ImageNet weights and real photos (crops of
scikit-image's bundled ones): the gate passes what keeps the answers and refuses what does not (a
deliberately damaged INT8 calibration among them), the measurement is cached and reused, and the
precision reported is the one the compiled model executes."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from api.engine.model.choice import MeasurementNeeded
from api.engine.model.classifier import Classifier
from api.engine.model.loader import load_classifier
from api.engine.model.measure.evalset import MIN_HELD_OUT, scan
from api.engine.model.runtimes.openvino_runtime import OpenVINORuntime, executed_precision
from api.ops.demo import crops
from tests.helpers import load_model, model_settings


def _evaluation(classifier: Classifier) -> dict:
    evaluation = classifier.describe()["evaluation"]
    assert evaluation is not None
    return evaluation


def _candidate(evaluation: dict, precision: str) -> dict:
    return next(c for c in evaluation["candidates"] if c["runtime"] == "openvino" and c["precision"] == precision)


def _executes(classifier: Classifier) -> str:
    assert isinstance(classifier.runtime, OpenVINORuntime)
    return executed_precision(classifier.runtime.compiled)


def _top1(classifier: Classifier, images: list[Image.Image]) -> np.ndarray:
    return classifier.forward([classifier.prepare(image) for image in images]).argmax(-1).numpy()


def test_auto_serves_the_fastest_candidate_that_passes_and_its_answers_agree_on_other_crops(
    demo_dir: Path, demo_eval_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "cache"
    caplog.set_level(logging.INFO, logger="api.engine")
    served = load_model(demo_dir, runtime="auto", precision="auto", eval_dir=demo_eval_dir, cache_dir=cache)
    evaluation = _evaluation(served)
    assert evaluation["images"] == 360 and evaluation["held_out_images"] >= MIN_HELD_OUT
    assert not evaluation["labeled"] and evaluation["min_agreement"] == 0.99
    chosen = evaluation["chosen"]
    for c in evaluation["candidates"]:  # the gate is the rule it states, on what was measured
        assert c["passed"] == (c["top1_agreement"] >= 0.99), c
        if c["passed"]:
            assert c["img_s"] <= next(
                x["img_s"] for x in evaluation["candidates"] if (x["runtime"], x["precision"]) == tuple(chosen.values())
            )
    winner = next(
        c
        for c in evaluation["candidates"]
        if c["runtime"] == chosen["runtime"] and c["precision"] == chosen["precision"]
    )
    assert winner["passed"] and served.runtime.name == chosen["runtime"]
    assert served.runtime.precision == chosen["precision"] == served.describe()["precision"]
    if served.runtime.name == "openvino":
        assert _executes(served) == chosen["precision"]
    print(f"demo, auto: {served.describe()['runtime_reason']}; {evaluation['reason']}")

    # another set of crops, never measured: its top-1 answers are PyTorch fp32's
    others = crops(210, seed=1)
    reference = load_model(demo_dir, runtime="torch", precision="fp32")
    agreement = float(np.mean(_top1(served, others) == _top1(reference, others)))
    print(
        f"demo, auto ({chosen['runtime']} {chosen['precision']}): agrees with PyTorch fp32 on {agreement:.1%} of 210 other crops"
    )
    assert agreement >= 0.97

    caplog.clear()
    again = load_model(demo_dir, runtime="auto", precision="auto", eval_dir=demo_eval_dir, cache_dir=cache)
    # what the first load resolved, measured choice included, is read back: nothing is measured again. Which
    # candidate is fastest is this CPU's answer, not the test's: OpenVINO is served from the cache's snapshot
    # (no PyTorch model built); a PyTorch choice needs its module, built from the checkpoint, its choice read back
    read_back = (
        "served as the cache's snapshot describes it"
        if chosen["runtime"] == "openvino"
        else "the measured choice read from the cache"
    )
    assert read_back in caplog.text and "candidates measured" not in caplog.text
    assert _evaluation(again) == evaluation
    assert (again.runtime.name, again.runtime.precision) == (chosen["runtime"], chosen["precision"])


def test_the_gate_refuses_int8_from_a_damaged_calibration(demo_dir: Path, demo_eval_dir: Path, tmp_path: Path) -> None:
    """INT8 calibrated on the folder's calibration part passes a gate its agreement meets; calibrated on
    black images (the same folder, its calibration part blacked out) it is refused by the same gate."""
    lenient = 0.75  # a user's API_MIN_AGREEMENT; properly calibrated INT8 agrees on about 84 % here
    settings = model_settings(
        demo_dir,
        device="cpu",
        runtime="openvino",
        precision="auto",
        eval_dir=demo_eval_dir,
        min_agreement=lenient,
        cache_dir=tmp_path,
    )
    proper = load_classifier(settings)
    good = _candidate(_evaluation(proper), "int8")
    # its INT8 model gone from the cache: the engine process is told to have it measured again, and that
    # measures (quantizes) again rather than fail
    for entry in tmp_path.glob("openvino-int8-*"):
        shutil.rmtree(entry)
    with pytest.raises(MeasurementNeeded):
        load_classifier(settings, measure=False)
    assert load_classifier(settings).runtime.precision == "int8" and any(tmp_path.glob("openvino-int8-*"))
    damaged_dir = tmp_path / "damaged"
    shutil.copytree(demo_eval_dir, damaged_dir)
    folder = scan(damaged_dir)
    for path in folder.files[: folder.calibration]:
        with Image.open(path) as crop:
            size = crop.size
        Image.new("RGB", size).save(path, quality=90)
    damaged = load_model(demo_dir, runtime="openvino", precision="auto", eval_dir=damaged_dir, min_agreement=lenient)
    bad = _candidate(_evaluation(damaged), "int8")
    print(
        f"INT8 top-1 agreement with fp32: {good['top1_agreement']:.1%} calibrated, {bad['top1_agreement']:.1%} damaged"
    )
    assert good["passed"] and not bad["passed"]
    assert proper.describe()["precision"] == "int8" and _executes(proper) == "int8"  # the fastest that passed
    assert damaged.describe()["precision"] != "int8"
    assert "faster but refused: openvino int8" in damaged.describe()["precision_reason"]


def test_too_few_held_out_images_and_explicit_int8(demo_dir: Path, demo_eval_dir: Path, tmp_path: Path) -> None:
    few = tmp_path / "few"
    few.mkdir()
    for path in sorted(demo_eval_dir.glob("*.jpg"))[:60]:
        shutil.copy(path, few)
    auto = load_model(demo_dir, runtime="openvino", precision="auto", eval_dir=few, min_agreement=0.01)
    evaluation = _evaluation(auto)
    assert evaluation["held_out_images"] < MIN_HELD_OUT
    assert not any(c["passed"] for c in evaluation["candidates"])  # even fp32: too few to judge
    assert auto.describe()["precision"] == "fp32"
    assert f"only {evaluation['held_out_images']} held-out images" in auto.describe()["precision_reason"]

    asked = load_model(demo_dir, runtime="auto", precision="int8", eval_dir=demo_eval_dir)
    int8 = _candidate(_evaluation(asked), "int8")
    assert [c["precision"] for c in _evaluation(asked)["candidates"]] == ["int8"]
    assert asked.describe()["precision"] == "int8" and _executes(asked) == "int8"
    assert (
        int8["top1_agreement"] is not None
        and str(f"{int8['top1_agreement']:.1%}") in asked.describe()["precision_reason"]
    )
