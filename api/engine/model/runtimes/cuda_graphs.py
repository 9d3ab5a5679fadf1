"""The eager forward pass captured as one CUDA graph per padded batch size, then replayed."""

from __future__ import annotations

from collections.abc import Callable

import torch

Scores = Callable[[torch.Tensor], torch.Tensor]


class CudaGraphs:
    """One CUDA graph per batch size.

    An eager resnet50 launches hundreds of kernels per pass, each from Python: with decode threads
    and the event loop contending for the GIL, every launch can wait for it, and the GPU idles.
    A replay is one launch. Inputs are copied into the graph's own input tensor, outputs read from
    its own output tensor (valid until the next replay; only the inference thread replays).
    """

    def __init__(self, scores: Scores, input_size: tuple[int, int, int], device: torch.device, sizes: tuple[int, ...]):
        channels, height, width = input_size
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        pool = None
        for size in sorted(sizes, reverse=True):  # largest first: the smaller graphs reuse its memory pool
            static_in = torch.zeros((size, channels, height, width), device=device).contiguous(
                memory_format=torch.channels_last
            )
            side = torch.cuda.Stream(device)  # capture needs a warmed-up pass on a side stream
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                scores(static_in)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: a model swap captures while the served model's thread keeps launching on
            # the same GPU; the default ("global") would make that thread's allocations fail meanwhile
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                static_out = scores(static_in)
            pool = graph.pool()
            self._graphs[size] = (graph, static_in, static_out)

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(sorted(self._graphs))

    def replay(self, batch: torch.Tensor) -> torch.Tensor:
        graph, static_in, static_out = self._graphs[batch.shape[0]]
        static_in.copy_(batch)
        graph.replay()
        return static_out
