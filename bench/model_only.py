"""Model-only GPU throughput: resnet50 at batch 64/128/256, NCHW vs channels_last, fp16 autocast,
eager and CUDA-graph replay (what the engine serves). `python -m bench.model_only` on a GPU."""

from __future__ import annotations

import time

import timm
import torch


def rate(model: torch.nn.Module, batch: int, channels_last: bool, graphs: bool, seconds: float = 3.0) -> float:
    x = torch.randn(batch, 3, 224, 224, device="cuda")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    model = model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)

    def step() -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.float16, cache_enabled=False):
            return model(x)

    with torch.inference_mode():
        for _ in range(5):
            step()
        run = step
        if graphs:
            graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                step()
            torch.cuda.current_stream().wait_stream(stream)
            with torch.cuda.graph(graph):
                step()
            run = graph.replay  # type: ignore[assignment]
        torch.cuda.synchronize()
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            run()
            count += batch
        torch.cuda.synchronize()
        return count / (time.perf_counter() - started)


def main() -> None:
    torch.backends.cudnn.benchmark = True
    model = timm.create_model("resnet50", pretrained=False, num_classes=67).cuda().eval()
    print("| batch | layout | eager img/s | CUDA graph img/s |\n| --- | --- | --- | --- |")
    for batch in (64, 128, 256):
        for channels_last in (False, True):
            eager = rate(model, batch, channels_last, graphs=False)
            graphed = rate(model, batch, channels_last, graphs=True)
            print(f"| {batch} | {'channels_last' if channels_last else 'NCHW'} | {eager:,.0f} | {graphed:,.0f} |")


if __name__ == "__main__":
    main()
