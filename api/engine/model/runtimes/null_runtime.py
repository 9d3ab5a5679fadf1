"""`API_RUNTIME=null`: a forward pass that costs nothing, for measuring everything around it.

The front-end bench (bench/frontend.py) and the engine-loop feeder serve it so that HTTP, decoding,
the IPC and the batch loop are what is measured. It is not a model: image i's scores put all the
weight on class `pixels[i, 0, 0, 0] % C` (its first byte), so a test can tell that every answer went
back to the request that sent its image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class NullRuntime:
    classes: int
    name: str = "null"
    precision: str = "fp32"
    padded_sizes: tuple[int, ...] = ()

    def forward(self, pixels: np.ndarray) -> torch.Tensor:
        scores = np.zeros((pixels.shape[0], self.classes), dtype=np.float32)
        scores[np.arange(pixels.shape[0]), pixels[:, 0, 0, 0] % self.classes] = 1.0
        return torch.from_numpy(scores)

    def describe(self) -> dict[str, Any]:
        return {"runtime": self.name, "precision": self.precision, "note": "no model: a bench and test runtime"}
