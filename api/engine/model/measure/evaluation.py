"""Which runtime and precision serve on a CPU: every candidate measured, the gate, the choice.

A candidate is a (runtime, precision) pair: PyTorch and OpenVINO at fp32, bf16 where the CPU has it,
INT8 on OpenVINO. Each is timed (images per second at the largest batch, interleaved: the machine
drifts) and, with an evaluation folder (API_EVAL_DIR), run on its held-out images: top-1 agreement
with PyTorch fp32 (the model as trained), the largest score difference, accuracy when labels are
known. `API_PRECISION=auto` serves the fastest candidate that passes the gate (agreement >=
API_MIN_AGREEMENT on >= MIN_HELD_OUT images); without images, the fastest exact (fp32) one, and the
reason says what the others would give. No torch here: the loader builds the runtimes.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from api.engine.model.measure.evalset import MIN_HELD_OUT

Spec = tuple[str, str]  # (runtime, precision)
TIMED_PASSES = 3  # per candidate, interleaved, after one untimed pass each


@dataclass(frozen=True)
class Candidate:
    runtime: str
    precision: str
    img_s: float
    top1_agreement: float | None = None  # None: no evaluation images
    max_abs_dp: float | None = None
    accuracy: float | None = None  # None: unlabeled
    passed: bool | None = None  # None: not judged (no evaluation images)

    @property
    def spec(self) -> Spec:
        return (self.runtime, self.precision)

    @property
    def exact(self) -> bool:
        return self.precision == "fp32"


@dataclass(frozen=True)
class Evaluation:
    """What was measured and what was chosen: GET /api/v1/model's `evaluation`, the ready line's summary."""

    candidates: tuple[Candidate, ...]
    chosen: Spec
    reason: str
    min_agreement: float
    eval_set: dict[str, Any] = field(default_factory=dict)  # EvalSet.describe(), or {} without images

    @property
    def served(self) -> Candidate:
        return next(c for c in self.candidates if c.spec == self.chosen)

    def to_dict(self) -> dict[str, Any]:
        return {
            **{"folder": None, "images": 0, "labeled": False, "calibration_images": 0, "held_out_images": 0},
            **self.eval_set,
            "min_agreement": self.min_agreement,
            "min_held_out": MIN_HELD_OUT,
            "candidates": [asdict(c) for c in self.candidates],
            "chosen": {"runtime": self.chosen[0], "precision": self.chosen[1]},
            "reason": self.reason,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Evaluation:
        known = ("folder", "images", "labeled", "calibration_images", "held_out_images", "digest")
        return cls(
            candidates=tuple(Candidate(**c) for c in data["candidates"]),
            chosen=(data["chosen"]["runtime"], data["chosen"]["precision"]),
            reason=data["reason"],
            min_agreement=data["min_agreement"],
            eval_set={k: data[k] for k in known if k in data and data.get("images")},
        )

    def summary(self) -> str:
        """One line: every candidate's speed (and agreement), the chosen one marked."""
        parts = []
        for c in sorted(self.candidates, key=lambda c: -c.img_s):
            mark = "*" if c.spec == self.chosen else ""
            agreement = "" if c.top1_agreement is None else f" agrees {c.top1_agreement:.1%}"
            verdict = "" if c.passed is None else (" pass" if c.passed else " fail")
            parts.append(f"{mark}{c.runtime} {c.precision} {c.img_s:.0f} img/s{agreement}{verdict}")
        return "; ".join(parts)


def time_runtimes(runtimes: Mapping[Spec, Any], input_size: tuple[int, int, int], batch: int) -> dict[Spec, float]:
    """Images per second of each runtime at `batch`: one untimed pass each, then TIMED_PASSES
    interleaved (this machine drifts over seconds), the median."""
    height, width = input_size[1:]
    pixels = np.random.default_rng(0).integers(0, 256, (batch, height, width, 3), dtype=np.uint8)
    seconds: dict[Spec, list[float]] = {spec: [] for spec in runtimes}
    for runtime in runtimes.values():
        runtime.forward(pixels)  # first pass: allocation, kernel selection
    for _ in range(TIMED_PASSES):
        for spec, runtime in runtimes.items():
            started = time.perf_counter()
            runtime.forward(pixels)
            seconds[spec].append(time.perf_counter() - started)
    return {spec: round(batch / statistics.median(times), 2) for spec, times in seconds.items()}


def scores_of(forward: Callable[[np.ndarray], Any], pixels: np.ndarray, batch: int) -> np.ndarray:
    """A runtime's scores for many images, `batch` at a time."""
    return np.concatenate([np.asarray(forward(pixels[i : i + batch])) for i in range(0, len(pixels), batch)])


def judge(
    candidate: Candidate,
    scores: np.ndarray,
    reference: np.ndarray,
    labels: np.ndarray | None,
    *,
    min_agreement: float,
) -> Candidate:
    """The candidate with its answers on the held-out images compared with the reference's."""
    agreement = float(np.mean(scores.argmax(1) == reference.argmax(1))) if len(scores) else 0.0
    accuracy = None
    if labels is not None and (labels >= 0).any():
        known = labels >= 0
        accuracy = round(float(np.mean(scores.argmax(1)[known] == labels[known])), 4)
    return replace(
        candidate,
        top1_agreement=round(agreement, 4),
        max_abs_dp=round(float(np.abs(scores - reference).max()), 4) if len(scores) else None,
        accuracy=accuracy,
        passed=len(scores) >= MIN_HELD_OUT and agreement >= min_agreement,
    )


def choose(candidates: list[Candidate], *, asked: str, min_agreement: float, held_out: int | None) -> Evaluation:
    """The candidate that serves, and why (API_PRECISION=`asked`; `held_out` None: no evaluation images)."""
    fastest = sorted(candidates, key=lambda c: -c.img_s)
    if asked != "auto":
        chosen = fastest[0]  # every candidate has the asked precision: the faster runtime
        reason = f"API_PRECISION={asked}: served as asked, on {chosen.runtime}" + _judged(chosen)
    elif held_out is None:
        chosen = next(c for c in fastest if c.exact)
        faster = [c for c in fastest if c.img_s > chosen.img_s and not c.exact]
        reason = "API_PRECISION=auto without API_EVAL_DIR: exact fp32 on " + chosen.runtime
        if faster:
            gains = ", ".join(f"{c.runtime} {c.precision} {c.img_s / chosen.img_s:.1f}x" for c in faster)
            reason += (
                f"; measured faster here: {gains}. Set API_EVAL_DIR to a folder of your own images to serve "
                "one of them where its answers agree with fp32, or set API_PRECISION to choose one yourself"
            )
    else:
        passing = [c for c in fastest if c.passed]
        if not passing:  # too few images, or not even fp32 agrees: exact fp32, never a gamble
            chosen = next(c for c in fastest if c.exact)
            why = (
                f"only {held_out} held-out images (the gate needs {MIN_HELD_OUT})"
                if held_out < MIN_HELD_OUT
                else ("no candidate passed the gate")
            )
            reason = f"API_PRECISION=auto: exact fp32 on {chosen.runtime}, since {why}"
        else:
            chosen = passing[0]
            reason = (
                f"API_PRECISION=auto: {chosen.runtime} {chosen.precision}, the fastest whose top-1 answers agree with "
                f"PyTorch fp32 on >= {min_agreement:.0%} of {held_out} held-out images ({chosen.top1_agreement:.1%})"
            )
            failed = [c for c in fastest if c.img_s > chosen.img_s and not c.passed]
            if failed:
                reason += "; faster but refused: " + ", ".join(
                    f"{c.runtime} {c.precision} ({c.top1_agreement:.1%})" for c in failed
                )
    return Evaluation(tuple(candidates), chosen.spec, reason, min_agreement)


def _judged(candidate: Candidate) -> str:
    if candidate.top1_agreement is None:
        return ""
    verdict = "passes" if candidate.passed else "does not pass"
    return f"; agrees with PyTorch fp32 on {candidate.top1_agreement:.1%} of the held-out images ({verdict} the gate)"
