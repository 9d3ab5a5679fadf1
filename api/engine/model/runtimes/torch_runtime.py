"""The PyTorch runtime: eager (or torch.compile'd) timm module, autocast, CUDA graphs on a GPU."""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from api.engine.model.runtimes.base import Head, pad_rows
from api.engine.model.runtimes.cuda_graphs import CudaGraphs
from api.errors import first_line

logger = logging.getLogger(__name__)

AUTOCAST: dict[str, torch.dtype | None] = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True, eq=False)
class TorchRuntime:
    model: torch.nn.Module
    device: torch.device
    head: Head
    precision: str = "fp32"
    padded_sizes: tuple[int, ...] = ()  # compiled / CUDA: batches padded to these sizes (no new shapes)
    compiled: bool = False
    graphs: CudaGraphs | None = None  # on CUDA: the forward pass replayed per padded size (API_CUDA_GRAPHS)
    name: str = "torch"
    _mean: torch.Tensor = field(init=False, repr=False)
    _std: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_mean", torch.tensor(self.head.mean, device=self.device).view(1, -1, 1, 1))
        object.__setattr__(self, "_std", torch.tensor(self.head.std, device=self.device).view(1, -1, 1, 1))

    @torch.inference_mode()
    def forward(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        """N x H x W x 3 uint8 (on the host, or already on the device: resized there) -> scores."""
        rows = pixels.shape[0]
        if isinstance(pixels, torch.Tensor):
            batch = pixels.to(self.device)
            if self.padded_sizes:
                size = next((s for s in self.padded_sizes if s >= rows), rows)
                batch = torch.cat([batch, batch.new_zeros((size - rows, *batch.shape[1:]))]) if size > rows else batch
        else:
            if self.padded_sizes:
                pixels = pad_rows(pixels, self.padded_sizes)
            batch = self._to_device(torch.from_numpy(pixels))  # N x H x W x 3 uint8
        # NHWC permuted to NCHW is channels_last in memory already: no copy for the model's layout.
        batch = batch.permute(0, 3, 1, 2).float().div_(255).sub_(self._mean).div_(self._std)
        if self.graphs is not None and batch.shape[0] in self.graphs.sizes:
            scores = self.graphs.replay(batch)  # the graph's own output: copied out below, before the next replay
        else:
            scores = self.scores(batch)
        return scores[:rows].cpu()

    def _to_device(self, batch: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":  # pinned host memory lets the copy overlap with compute
            return batch.pin_memory().to(self.device, non_blocking=True)
        return batch.to(self.device)

    def scores(self, batch: torch.Tensor) -> torch.Tensor:
        """Normalised batch on the model's device -> float32 scores on that device (the eager pass)."""
        # no autocast weight cache: each pass casts every weight once anyway, and a CUDA graph
        # must not keep pointers to a cache that is freed when the context ends
        dtype = AUTOCAST[self.precision]
        context = (
            torch.autocast(self.device.type, dtype=dtype, cache_enabled=False) if dtype is not None else nullcontext()
        )
        with context:
            logits = self.model(batch)
        if isinstance(logits, tuple | list):  # some scripted models return (logits, aux)
            logits = logits[0]
        return self.head.scores(logits)

    def describe(self) -> dict[str, Any]:
        return {
            "runtime": self.name,
            "precision": self.precision,
            "compiled": self.compiled,
            "cuda_graphs": self.graphs is not None,
            "padded_sizes": list(self.padded_sizes),
        }

    @torch.inference_mode()
    def with_cuda_graphs(self, input_size: tuple[int, int, int]) -> TorchRuntime:
        """This runtime replaying one CUDA graph per padded size, or itself when capture fails."""
        try:
            graphs = CudaGraphs(self.scores, input_size, self.device, self.padded_sizes)
        except Exception as error:  # a model that cannot be captured still serves, eagerly
            logger.warning("API_CUDA_GRAPHS: capture failed (%s); serving the eager forward pass", first_line(error))
            return self
        return replace(self, graphs=graphs)
