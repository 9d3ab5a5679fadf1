"""Calibrated confidence: one temperature, fitted on the user's labeled images, applied to every score.

Temperature scaling (Guo et al., 2017): the served probabilities become softmax(log p / T), which
keeps every top-1 answer and makes a score of 0.8 right about 80 % of the time. T minimises the
negative log-likelihood on the calibration part of a labeled API_EVAL_DIR (for a fold ensemble, of
the ensemble's mean probabilities); expected calibration error (15 equal-width bins of confidence),
NLL and accuracy are reported on the held-out part, before and after, so the fit is judged on
images it did not see. API_TEMPERATURE pins T instead. Single-label models only: a multi-label
model's thresholds are its own calibration.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

METHOD = "temperature-map-1"  # in the model cache's key: a changed fit is measured again
BINS = 15
MIN_FIT = 20  # labeled calibration images below which no temperature is fitted (T = 1)


@dataclass(frozen=True)
class Calibration:
    """The served temperature, where it came from and what it does on the held-out images."""

    temperature: float
    source: str  # "fitted", "pinned" (API_TEMPERATURE) or "none"
    fit_images: int = 0
    held_out_images: int = 0
    accuracy: float | None = None
    ece_before: float | None = None
    ece_after: float | None = None
    nll_before: float | None = None
    nll_after: float | None = None
    reliability_before: tuple[dict[str, float], ...] = ()  # per bin: lower, upper, count, confidence, accuracy
    reliability_after: tuple[dict[str, float], ...] = ()
    confusion: tuple[tuple[int, ...], ...] = ()  # [true label][answered label] on the held-out images
    fold_accuracy: tuple[float, ...] = ()  # each fold alone on the held-out images (an ensemble)
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["reliability_before"] = list(self.reliability_before)
        data["reliability_after"] = list(self.reliability_after)
        data["confusion"] = [list(row) for row in self.confusion]
        data["fold_accuracy"] = list(self.fold_accuracy)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Calibration:
        return cls(
            **{
                **data,
                "reliability_before": tuple(data["reliability_before"]),
                "reliability_after": tuple(data["reliability_after"]),
                "confusion": tuple(tuple(row) for row in data["confusion"]),
                "fold_accuracy": tuple(data["fold_accuracy"]),
            }
        )


def temper(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T), row by row."""
    logits = np.log(np.clip(probabilities, 1e-12, None)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return exp / exp.sum(axis=1, keepdims=True)


def negative_log_likelihood(probabilities: np.ndarray, labels: np.ndarray) -> float:
    picked = probabilities[np.arange(len(labels)), labels]
    return float(-np.mean(np.log(np.clip(picked, 1e-12, None))))


def _binned(probabilities: np.ndarray, labels: np.ndarray, bins: int) -> list[tuple[int, float, float]]:
    """Confidence (top score) in `bins` equal-width bins: each bin's count, mean confidence and accuracy."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)  # (lower, upper]
    out = []
    for b in range(bins):
        inside = which == b
        count = int(inside.sum())
        out.append(
            (count, float(confidence[inside].mean()) if count else 0.0, float(correct[inside].mean()) if count else 0.0)
        )
    return out


def reliability(probabilities: np.ndarray, labels: np.ndarray, bins: int = BINS) -> list[dict[str, float]]:
    """The reliability diagram's table: per bin of confidence, its count, mean confidence and accuracy."""
    return [
        {
            "lower": round(b / bins, 4),
            "upper": round((b + 1) / bins, 4),
            "count": count,
            "confidence": round(confidence, 4),
            "accuracy": round(accuracy, 4),
        }
        for b, (count, confidence, accuracy) in enumerate(_binned(probabilities, labels, bins))
    ]


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = BINS) -> float:
    """Σ over bins of (share of images in the bin) x |accuracy - mean confidence| (Naeini et al., 2015)."""
    total = max(len(labels), 1)
    return sum(
        count / total * abs(accuracy - confidence)
        for count, confidence, accuracy in _binned(probabilities, labels, bins)
    )


def fit_temperature(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """The most probable T given the images: the NLL of softmax(log p / T), summed, plus a standard
    normal prior on log T (L-BFGS on log T, as the paper's own code fits it).

    The prior matters only for few images or few mistakes: where every calibration image is answered
    right, the NLL alone keeps falling as T -> 0 (every score pushed to 0 or 1, the next mistake made
    with certainty); with it, T stays where the evidence puts it."""
    log_p = torch.from_numpy(np.log(np.clip(probabilities, 1e-12, None))).double()
    target = torch.from_numpy(labels).long()
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        nll = torch.nn.functional.cross_entropy(log_p / log_t.exp(), target, reduction="sum")
        value = nll + 0.5 * (log_t**2).sum()
        value.backward()
        return value

    optimizer.step(loss)
    return float(np.clip(log_t.exp().item(), 0.05, 20.0))


def unmeasured(pinned: float | None) -> Calibration:
    """The temperature where no labeled image measures it: API_TEMPERATURE, else 1."""
    if pinned is not None:
        return Calibration(pinned, "pinned", reason="API_TEMPERATURE; no labeled held-out images to measure it on")
    return Calibration(1.0, "none", reason="no labeled API_EVAL_DIR: scores are the model's own")


def calibrate(
    probabilities: np.ndarray,
    labels: np.ndarray | None,
    *,
    fit: int,
    pinned: float | None,
    fold_probabilities: np.ndarray | None = None,
) -> Calibration:
    """The temperature for the model whose uncalibrated `probabilities` (N x C, on the evaluation
    images in split order: the first `fit` calibrate) these are, and what it does on the rest.

    `labels`: each image's class index (-1: a class the model does not have), None when unlabeled.
    `fold_probabilities` (N x k x C): each fold's own, for the folds' accuracy alone."""
    if labels is None or not (labels[fit:] >= 0).any():
        return unmeasured(pinned)
    known = labels >= 0
    fit_known = np.flatnonzero(known[:fit])
    held = fit + np.flatnonzero(known[fit:])
    if pinned is not None:
        temperature, source, reason = pinned, "pinned", "API_TEMPERATURE"
    elif len(fit_known) < MIN_FIT:
        temperature, source = 1.0, "none"
        reason = f"only {len(fit_known)} labeled calibration images (at least {MIN_FIT} fit a temperature)"
    else:
        temperature, source = fit_temperature(probabilities[fit_known], labels[fit_known]), "fitted"
        reason = f"fitted on {len(fit_known)} labeled calibration images (negative log-likelihood)"
    before, truth = probabilities[held], labels[held]
    after = temper(before, temperature)
    classes = probabilities.shape[1]
    confusion = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(confusion, (truth, after.argmax(axis=1)), 1)
    folds: tuple[float, ...] = ()
    if fold_probabilities is not None:
        folds = tuple(
            round(float(np.mean(fold_probabilities[held, k].argmax(axis=1) == truth)), 4)
            for k in range(fold_probabilities.shape[1])
        )
    return Calibration(
        temperature=round(temperature, 4),
        source=source,
        fit_images=len(fit_known),
        held_out_images=len(held),
        accuracy=round(float(np.mean(after.argmax(axis=1) == truth)), 4),
        ece_before=round(expected_calibration_error(before, truth), 4),
        ece_after=round(expected_calibration_error(after, truth), 4),
        nll_before=round(negative_log_likelihood(before, truth), 4),
        nll_after=round(negative_log_likelihood(after, truth), 4),
        reliability_before=tuple(reliability(before, truth)),
        reliability_after=tuple(reliability(after, truth)),
        confusion=tuple(tuple(int(v) for v in row) for row in confusion),
        fold_accuracy=folds,
        reason=reason,
    )
