"""What is being served, as every answer names it: architecture, labels, device, the checkpoint's
digest (the model version), and how scores become ranked labels. No torch: front-ends hold one too."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Served:
    """What is being served, as the answers name it."""

    architecture: str
    class_names: tuple[str, ...]
    device: str
    checkpoint_sha256: str
    multi_label: bool
    threshold: float  # API_THRESHOLD: multi-label answers hold every label at or above it
    runtime: str  # what runs the forward pass, and in which precision (the info metric names both)
    precision: str
    folds: int  # 1, or the k folds answering as one model (their scores are followed by their spread)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def width(self) -> int:
        """Floats per image the engine answers: the scores, then (an ensemble) their spread across folds."""
        return self.num_classes * (2 if self.folds > 1 else 1)

    def split(self, row: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """One image's answer -> its scores and, for a fold ensemble, their spread (else None)."""
        classes = self.num_classes
        return row[:classes], (row[classes : 2 * classes] if self.folds > 1 else None)

    @property
    def version(self) -> str:
        """The model version every answer names: the checkpoint's short sha256 (of k folds: over all theirs)."""
        return self.checkpoint_sha256[:12]

    def rank(self, scores: np.ndarray, top_k: int) -> list[tuple[int, str, float]]:
        """One image's scores -> [(index, label, score)], best first.

        Single-label: the `top_k` best. Multi-label: every label at or above the threshold.
        """
        if self.multi_label:
            above = np.flatnonzero(scores >= self.threshold)
            order = above[np.argsort(-scores[above], kind="stable")]
        else:
            order = np.argsort(-scores, kind="stable")[: min(top_k, scores.size)]
        return [(int(i), self.class_names[int(i)], float(scores[int(i)])) for i in order]

    def to_dict(self) -> dict[str, Any]:
        return {
            "architecture": self.architecture,
            "class_names": list(self.class_names),
            "device": self.device,
            "checkpoint_sha256": self.checkpoint_sha256,
            "multi_label": self.multi_label,
            "threshold": self.threshold,
            "runtime": self.runtime,
            "precision": self.precision,
            "folds": self.folds,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Served:
        return cls(**{**data, "class_names": tuple(data["class_names"])})
