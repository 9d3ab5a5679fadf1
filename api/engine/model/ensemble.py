"""k folds served as one model: one module holding the k networks side by side.

`FoldEnsemble(x)` answers N x k x C logits in one call, so every runtime takes the folds in one forward
pass: OpenVINO converts the k networks into one graph (one inference call per batch), INT8 quantizes
them together, CUDA graphs replay them as one graph. The head (api/engine/model/runtimes/base.py)
turns the k rows into the mean of the folds' probabilities and their spread.

The folds must be interchangeable: the same labels, head and preprocessing. `check_folds` stops the
load naming the first fold that differs from the first one, and how.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from api.errors import CheckpointMismatch


class FoldEnsemble(torch.nn.Module):
    """k classifiers with the same input and labels -> N x k x C logits."""

    def __init__(self, folds: Sequence[torch.nn.Module]):
        super().__init__()
        self.folds = torch.nn.ModuleList(folds)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = [fold(x) for fold in self.folds]
        return torch.stack([o[0] if isinstance(o, tuple | list) else o for o in outputs], dim=1)


@dataclass(frozen=True)
class Fold:
    """One fold as GET /api/v1/model lists it."""

    name: str
    path: str
    sha256: str
    architecture: str
    recorded_score: tuple[str, float] | None  # what its checkpoint says it scored in training, if anything

    def to_dict(self) -> dict[str, Any]:
        score = self.recorded_score
        return {
            "name": self.name,
            "path": self.path,
            "sha256": self.sha256,
            "architecture": self.architecture,
            "recorded_score": None if score is None else {"key": score[0], "value": score[1]},
        }


def ensemble_sha256(digests: Sequence[str]) -> str:
    """The version of k folds: a digest over the folds' own digests, in fold order (one fold: its own)."""
    if len(digests) == 1:
        return digests[0]
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()


def common_folder(paths: Sequence[Path]) -> Path:
    """Where the folds live: the deepest folder holding them all."""
    parts = [p.resolve().parts for p in paths]
    shared = []
    for column in zip(*parts, strict=False):
        if len(set(column)) != 1:
            break
        shared.append(column[0])
    return Path(*shared) if shared else Path("/")


def check_folds(names: Sequence[str], facts: Sequence[dict[str, Any]]) -> None:
    """Stop unless every fold matches the first on what makes answers comparable: labels, the head's
    outputs, the preprocessing (input size, resize, crop, mean, std, interpolation)."""
    first = facts[0]
    for name, fact in zip(names[1:], facts[1:], strict=True):
        for key in ("class_names", "preprocessing"):
            if fact[key] != first[key]:
                raise CheckpointMismatch(
                    f"fold {name} differs from fold {names[0]} in its {key.replace('_', ' ')}: "
                    f"{_brief(key, fact[key], first[key])}; every fold of an ensemble must share labels, head "
                    "and preprocessing (API_FOLDS picks the folds to serve)"
                )


def _brief(key: str, theirs: Any, ours: Any) -> str:
    if key == "class_names":
        if len(theirs) != len(ours):
            return f"{len(theirs)} classes instead of {len(ours)}"
        at = next(i for i, (a, b) in enumerate(zip(theirs, ours, strict=True)) if a != b)
        return f"label {at} is {theirs[at]!r} instead of {ours[at]!r}"
    if isinstance(theirs, dict):
        differ = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        return ", ".join(f"{k} {theirs.get(k)} instead of {ours.get(k)}" for k in differ)
    return f"{theirs} instead of {ours}"
