"""What runs the forward pass: the `Runtime` protocol, and the CPU facts its choice reads
(api/engine/model/choice.py chooses).

A runtime is built complete by the loader and never changed afterwards. It takes a batch of the
decode pool's output (N x H x W x 3 uint8, already resized and cropped) and answers float32 scores
on the CPU (softmax, or sigmoid for multi-label models; a fold ensemble's are followed by their
spread across folds: N x 2C, api/engine/model/ensemble.py). Normalisation is the runtime's job: on a
GPU it runs there, in OpenVINO it is part of the compiled graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

CPUINFO = Path("/proc/cpuinfo")
# CPU flags that make bf16 a hardware type (Intel AMX, AVX512-BF16); elsewhere it is emulated, and slow
BF16_FLAGS = ("amx_bf16", "avx512_bf16")


class Runtime(Protocol):
    @property
    def name(self) -> str:
        """ "torch" or "openvino"."""
        ...

    @property
    def precision(self) -> str:
        """ "fp32", "fp16", "bf16" or "int8": what the forward pass computes in."""
        ...

    @property
    def padded_sizes(self) -> tuple[int, ...]:
        """Batch sizes it is fed (padded up to); () = any."""
        ...

    def forward(self, pixels: np.ndarray) -> torch.Tensor:
        """N x H x W x 3 uint8 -> N x C float32 scores on the CPU (N x 2C for a fold ensemble: + spread)."""
        ...

    def describe(self) -> dict[str, Any]:
        """What it is, for the model-info route and the ready line."""
        ...


@dataclass(frozen=True)
class Head:
    """How logits become scores, and the normalisation in front of the model (timm's data config).

    One model's N x C logits: softmax (sigmoid for multi-label) of logits / temperature. A fold
    ensemble's N x k x C logits (api/engine/model/ensemble.py): each fold's probabilities, then N x 2C:
    their mean, tempered, followed by their spread (the population standard deviation across folds,
    before tempering). `per_fold`: N x k*C, each fold's own probabilities (the evaluation's reference)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    multi_label: bool = False
    temperature: float = (
        1.0  # fitted on a labeled API_EVAL_DIR, or API_TEMPERATURE (api/engine/model/measure/calibration.py)
    )
    per_fold: bool = False

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if logits.ndim == 2:
            tempered = logits / self.temperature if self.temperature != 1.0 else logits
            return tempered.sigmoid() if self.multi_label else tempered.softmax(dim=-1)
        probabilities = logits.sigmoid() if self.multi_label else logits.softmax(dim=-1)
        if self.per_fold:
            return probabilities.flatten(1)
        mean = probabilities.mean(dim=1)
        spread = probabilities.std(dim=1, correction=0)
        return torch.cat([self.temper(mean), spread], dim=1)

    def temper(self, probabilities: torch.Tensor) -> torch.Tensor:
        """Probabilities as if their logits were divided by the temperature (softmax, or each sigmoid)."""
        if self.temperature == 1.0:
            return probabilities
        if self.multi_label:
            return (torch.logit(probabilities, eps=1e-7) / self.temperature).sigmoid()
        return (probabilities.clamp_min(1e-12).log() / self.temperature).softmax(dim=-1)


def cpu_flags(cpuinfo: Path = CPUINFO) -> frozenset[str]:
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_bf16(cpuinfo: Path = CPUINFO) -> bool:
    """True when bf16 is a hardware type here (AMX or AVX512-BF16)."""
    return any(flag in cpu_flags(cpuinfo) for flag in BF16_FLAGS)


def cpu_model_name(cpuinfo: Path = CPUINFO) -> str:
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return "unknown cpu"


def pad_rows(pixels: np.ndarray, sizes: tuple[int, ...]) -> np.ndarray:
    """Pad a batch with zero images up to the next of `sizes` (no new shapes for a compiled model)."""
    rows = pixels.shape[0]
    size = next((s for s in sizes if s >= rows), rows)
    if size == rows:
        return pixels
    return np.concatenate([pixels, np.zeros((size - rows, *pixels.shape[1:]), dtype=pixels.dtype)])


def batch_buckets(max_batch_size: int) -> tuple[int, ...]:
    """The batch sizes a padded model sees: powers of two up to, and including, the largest batch."""
    return tuple(sorted({min(2**i, max_batch_size) for i in range(max_batch_size.bit_length() + 1)}))
