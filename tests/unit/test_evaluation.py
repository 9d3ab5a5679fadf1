"""The gate and the choice on measured candidates; the evaluation folder's split and digest; the settings
that stop start-up."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from api.config import load_settings
from api.engine.model.measure.evalset import MIN_HELD_OUT, scan
from api.engine.model.measure.evaluation import Candidate, Evaluation, choose, judge
from api.errors import ConfigError


def _measured(rt: str, precision: str, img_s: float, agreement: float, *, held_out: int = 200) -> Candidate:
    reference = np.eye(4)[np.arange(held_out) % 4]
    scores = reference.copy()
    flipped = round(held_out * (1 - agreement))
    scores[:flipped] = np.roll(reference[:flipped], 1, axis=1)
    return judge(Candidate(rt, precision, img_s), scores, reference, None, min_agreement=0.99)


def test_judge_measures_agreement_and_applies_the_gate() -> None:
    good, bad = _measured("openvino", "int8", 200, 1.0), _measured("openvino", "int8", 200, 0.95)
    assert good.top1_agreement == 1.0 and good.passed and good.max_abs_dp == 0.0
    assert bad.top1_agreement == 0.95 and not bad.passed and bad.max_abs_dp == 1.0
    few = _measured("openvino", "int8", 200, 1.0, held_out=MIN_HELD_OUT - 1)
    assert few.top1_agreement == 1.0 and not few.passed  # too few images to trust


def test_auto_serves_the_fastest_that_passes_and_names_the_faster_refused() -> None:
    candidates = [
        _measured("torch", "fp32", 40, 1.0),
        _measured("openvino", "fp32", 50, 1.0),
        _measured("openvino", "bf16", 100, 0.995),
        _measured("openvino", "int8", 200, 0.90),
    ]
    evaluation = choose(candidates, asked="auto", min_agreement=0.99, held_out=200)
    assert evaluation.chosen == ("openvino", "bf16")
    assert "faster but refused: openvino int8 (90.0%)" in evaluation.reason
    again = Evaluation.from_dict(evaluation.to_dict())
    assert again.chosen == evaluation.chosen and again.candidates == evaluation.candidates
    assert "*openvino bf16" in evaluation.summary()


def test_without_images_auto_stays_exact_and_an_asked_precision_is_served() -> None:
    speeds = [Candidate("torch", "fp32", 40), Candidate("openvino", "fp32", 50), Candidate("openvino", "int8", 200)]
    exact = choose(speeds, asked="auto", min_agreement=0.99, held_out=None)
    assert exact.chosen == ("openvino", "fp32")
    assert "openvino int8 4.0x" in exact.reason and "API_EVAL_DIR" in exact.reason
    asked = choose(
        [Candidate("openvino", "bf16", 90), Candidate("torch", "bf16", 70)],
        asked="bf16",
        min_agreement=0.99,
        held_out=None,
    )
    assert asked.chosen == ("openvino", "bf16") and asked.reason.startswith("API_PRECISION=bf16")


def _image(path: Path, shade: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (shade, shade, shade)).save(path)


def test_the_folder_is_labeled_by_subfolders_and_split_the_same_way_every_time(tmp_path: Path) -> None:
    for i in range(30):
        _image(tmp_path / "labeled" / ("cat" if i % 2 else "dog") / f"{i}.png", i)
        _image(tmp_path / "flat" / f"{i}.png", i)
    (tmp_path / "flat" / "notes.txt").write_text("not an image")
    labeled, flat = scan(tmp_path / "labeled"), scan(tmp_path / "flat")
    assert labeled.labels is not None and set(labeled.labels) == {"cat", "dog"} and len(labeled.files) == 30
    assert flat.labels is None and len(flat.files) == 30
    assert flat.calibration == 12 and flat.held_out == 18  # 40 % calibrate
    assert scan(tmp_path / "flat") == flat  # the same split and digest
    os.utime(flat.files[0], ns=(1, 1))
    assert scan(tmp_path / "flat").digest != flat.digest  # a changed file: a new evaluation


def test_int8_without_images_stops_start_up_naming_the_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no .env
    for env, words in [
        ({"API_PRECISION": "int8"}, "API_PRECISION=int8 needs API_EVAL_DIR"),
        ({"API_EVAL_DIR": str(tmp_path / "missing")}, "API_EVAL_DIR.*is not a folder"),
        ({"API_PRECISION": "int8", "API_RUNTIME": "torch", "API_EVAL_DIR": str(tmp_path)}, "API_RUNTIME=torch"),
    ]:
        with monkeypatch.context() as patched:
            for name, value in env.items():
                patched.setenv(name, value)
            with pytest.raises(ConfigError, match=words) as stopped:
                load_settings()
            assert "\n" not in str(stopped.value)
