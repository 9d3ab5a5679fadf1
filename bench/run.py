"""Service throughput and latency against the in-process ceiling, measured in one run.

    make bench            # or: .venv/bin/python -m bench.run --help

1. The ceiling: the service's own pipeline object (`api.engine.serving.service.Engine`: decode pool,
   batcher, runtime, ranking) called in-process, without HTTP, at concurrency 1..16 (or twice the
   service's largest batch), with the same runtime (`--runtime`, `--precision`: the ceiling converts
   and times into a fresh model cache that the service then reads). The best level is measured
   again, 3x longer (the best of a noisy sweep alone would be biased upwards), and again after
   every service level, for images/s (the median of those samples: this machine's speed drifts
   over minutes); and the batch-1 latency, sampled at the same moments.
2. The service: `cat-breeds-api serve` on 127.0.0.1, a bounded number of requests at concurrency
   1, 4, 16 and 64 per image (a minimal keep-alive HTTP client, so the load generator takes as
   little of the shared CPU as it can), images/s and p50/p90/p99 latency, as ratios of the ceiling.
3. The same service with reduced-scale decoding off (large JPEG), and the multi-worker shape
   (Gunicorn, N workers x 1 thread) against one worker with all threads.

Writes artifacts/bench/results.json and artifacts/bench/throughput_vs_p99.png.
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import skimage.data
import timm
import torch
from PIL import Image

from api.cpu import cpu_budget
from api.engine.model.files.labels import CAT_BREEDS
from api.engine.serving.batching import IDLE_TRIM_S
from bench import report, stamp
from bench.ceiling import Ceiling
from bench.service import Server, sweep

ROOT = Path(__file__).resolve().parents[1]


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def images() -> dict[str, bytes]:
    chelsea = Image.fromarray(skimage.data.chelsea())
    return {
        "chelsea_451x300": _jpeg(chelsea),
        "photo_1600x1066": _jpeg(chelsea.resize((1600, 1066), Image.Resampling.BICUBIC)),
    }


def write_checkpoint(folder: Path, model_name: str, num_classes: int) -> Path:
    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False, num_classes=num_classes)
    path = folder / "best_model.pt"
    torch.save({"model_state_dict": model.state_dict(), "class_names": list(CAT_BREEDS)[:num_classes]}, path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--num-classes", type=int, default=67)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--runtime", default="auto", choices=["auto", "torch", "openvino"])
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    parser.add_argument("--max-batch-size", type=int, default=8, help="API_MAX_BATCH_SIZE of the service")
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--requests", type=int, default=160, help="requests per concurrency level (at least 2x it)")
    parser.add_argument("--ceiling-images", type=int, default=32, help="images per batch size for the ceiling")
    parser.add_argument("--latency-samples", type=int, default=15)
    parser.add_argument("--max-queue", type=int, default=64)
    parser.add_argument("--images", default="chelsea_451x300,photo_1600x1066", help="which photos, comma-separated")
    parser.add_argument("--workers", type=int, default=1, help="service workers (more than 1: Gunicorn)")
    parser.add_argument("--skip-extras", action="store_true", help="no reduced-decode-off and multi-worker runs")
    parser.add_argument(
        "--no-baseline", dest="baseline", action="store_false", help="no PyTorch fp32 service run for comparison"
    )
    parser.add_argument(
        "--server-env", action="append", default=[], metavar="NAME=VALUE", help="extra environment for the service"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "artifacts" / "bench")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    # concurrency levels of the in-process ceiling
    args.ceiling_batches = [b for b in (1, 2, 4, 8, 16, 32, 64, 128) if b <= max(16, 2 * args.max_batch_size)]
    args.out.mkdir(parents=True, exist_ok=True)
    photos = {name: data for name, data in images().items() if name in args.images.split(",")}
    results: dict[str, Any] = {
        "model": args.model,
        "device": args.device,
        "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None,
        "precision": args.precision,
        "runtime": args.runtime,
        "max_batch_size": args.max_batch_size,
        "workers": args.workers,
        "cpus": cpu_budget(None).describe(),
        "images": {},
    }
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = write_checkpoint(Path(folder), args.model, args.num_classes)
        args.cache_dir = Path(folder) / "cache"  # empty: the ceiling converts and times; the service reads it
        # Ceilings first, with nothing else running; the large photo's ceiling decodes it fully. Each
        # is sampled again after every service level (the service idle by then): see Ceiling.
        ceiling = Ceiling(checkpoint, args)
        ceilings = {name: ceiling.measure(data, reduced=True) for name, data in photos.items()}
        results["runtime_chosen"] = ceiling.classifier.runtime_reason
        server = Server(checkpoint, args, workers=args.workers, **dict(item.split("=", 1) for item in args.server_env))
        results["cold_start_s"] = server.cold_start_s
        try:
            pss: list[float] = []
            for name, data in photos.items():

                def after_level(name: str = name, data: bytes = data) -> None:
                    pss.append(server.pss_mb())  # right after the level: nothing reads it under load
                    ceiling.resample(data, ceilings[name])

                rows = sweep(server, data, args, levels, after_level=after_level)
                for row, mb in zip(rows, pss[-len(rows) :], strict=True):
                    row["service_pss_mb"] = mb
                results["images"][name] = {"ceiling": ceilings[name], "service": rows}
            results["service_pss_mb"] = max(pss)
            results["service_peak_rss_mb"] = server.peak_rss_mb()  # the kernel's high-water mark (VmHWM)
            time.sleep(2 * IDLE_TRIM_S)  # idle: the inference thread hands freed memory back after IDLE_TRIM_S
            results["service_pss_idle_mb"] = server.pss_mb()
        finally:
            server.stop()
        ceiling.close()  # idle from here on
        if args.baseline and "chelsea_451x300" in photos and (args.runtime, args.precision) != ("torch", "fp32"):
            # today's service, PyTorch fp32, in the same run: the gain as a ratio, not across runs
            base = Server(checkpoint, args, API_RUNTIME="torch", API_PRECISION="fp32")
            try:
                results["torch_fp32_service"] = sweep(base, photos["chelsea_451x300"], args, [16])
            finally:
                base.stop()
        if not args.skip_extras and "photo_1600x1066" in photos:
            big = photos["photo_1600x1066"]
            off = Server(checkpoint, args, API_REDUCED_DECODE="false")
            try:
                results["reduced_decode_off"] = sweep(off, big, args, [16])
            finally:
                off.stop()
            workers = max(2, cpu_budget(None).threads)
            multi = Server(checkpoint, args, workers=workers)
            try:
                results["multi_worker"] = {
                    "workers": workers,
                    "threads_per_worker": max(1, cpu_budget(None).threads // workers),
                    "service": sweep(multi, photos["chelsea_451x300"], args, [16]),
                    "pss_mb": multi.pss_mb(),
                }
            finally:
                multi.stop()
    for name, entry in results["images"].items():
        print(report.table(name, entry["ceiling"], entry["service"]))
    results["summary"] = summary = report.summary(results)
    print("\nsummary: " + ", ".join(f"{k} {v:.2f}" for k, v in summary.items()))
    results["stamp"] = stamp.stamp()
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    report.plot(results, args.out / "throughput_vs_p99.png")
    print(f"wrote {args.out / 'results.json'} and {args.out / 'throughput_vs_p99.png'}")
    print("measured on: " + stamp.line(results["stamp"]))


if __name__ == "__main__":
    main()
