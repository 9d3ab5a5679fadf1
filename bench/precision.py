"""Precision by measurement, in numbers: `python -m bench.precision` (make bench-precision).

1. Model only: every candidate the service measures at load (PyTorch and OpenVINO at fp32, bf16 where
   the CPU has it, OpenVINO INT8 calibrated by NNCF) for resnet50 (67 classes), the demo
   (efficientnet-lite0, real ImageNet weights), efficientnet_b3 and convnext_base, each timed at batch 8
   as `API_PRECISION=auto` times them, and judged on the demo's held-out evaluation crops: top-1
   agreement with PyTorch fp32 and the largest score difference (random weights for all but the demo:
   their agreement says little; the demo's is the real one). The same tables as docs/performance.md.
2. The service: resnet50 (random weights) served by `cat-breeds-api serve` with `API_PRECISION=int8`
   and with `API_PRECISION=bf16` (or fp32 on a CPU without bf16), both with the evaluation folder,
   16 connections posting a 451x300 JPEG, alternated int8, other, other, int8 (the machine drifts); the
   ratio of the medians, and the INT8 service's PSS.
3. The service against the model alone, both at INT8: the INT8 resnet50 timed at batch 8 in this
   process (OpenVINO, the service's model from the same cache), then the INT8 service as in 2,
   alternated model, service, service, model; the ratio of the medians (issue 28: >= 0.70, the
   front-end's cost being what is left between them).

Results: printed, and artifacts/bench/precision.json with the stamp.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

from api.config import Settings
from api.engine.model.loader import load_classifier
from api.engine.model.runtimes.base import cpu_has_bf16
from api.ops.demo import write_demo_eval, write_demo_model
from bench import stamp
from bench.run import images, write_checkpoint
from bench.service import Server, load

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURES = {"resnet50": 67, "efficientnet_b3": 67, "convnext_base": 67}
ORDER = [("torch", "fp32"), ("torch", "bf16"), ("openvino", "fp32"), ("openvino", "bf16"), ("openvino", "int8")]


def measure(checkpoint: Path, name: str | None, eval_dir: Path, cache: Path, threads: int) -> dict[str, Any]:
    group = Settings(_env_file=None, checkpoint_path=checkpoint, model_name=name).model_group  # type: ignore[call-arg]
    settings = dataclasses.replace(group, device="cpu", eval_dir=eval_dir, cache_dir=cache)
    classifier = load_classifier(settings, threads=threads)
    evaluation = classifier.describe()["evaluation"]
    del classifier
    return evaluation


def model_tables(results: dict[str, dict[str, Any]]) -> str:
    header = "| model | " + " | ".join(f"{r} {p}" for r, p in ORDER) + " | served under auto |"
    lines = [header, "| --- " * (len(ORDER) + 2) + "|"]
    for name, evaluation in results.items():
        by = {(c["runtime"], c["precision"]): c for c in evaluation["candidates"]}
        cells = [f"{by[s]['img_s']:.0f}" if s in by else "–" for s in ORDER]
        chosen = evaluation["chosen"]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {chosen['runtime']} {chosen['precision']} |")
    lines += ["", "| model | candidate | top-1 agreement with PyTorch fp32 | max abs. score difference | gate |"]
    lines.append("| --- | --- | --- | --- | --- |")
    for name, evaluation in results.items():
        for c in sorted(evaluation["candidates"], key=lambda c: ORDER.index((c["runtime"], c["precision"]))):
            verdict = "passed" if c["passed"] else "refused"
            lines.append(
                f"| {name} | {c['runtime']} {c['precision']} | {c['top1_agreement']:.1%} | {c['max_abs_dp']:.3f} "
                f"| {verdict} |"
            )
    return "\n".join(lines)


def service_ratio(checkpoint: Path, eval_dir: Path, cache: Path, requests: int, other: str) -> dict[str, Any]:
    args = argparse.Namespace(
        model="resnet50", num_classes=67, image_size=224, device="cpu", max_queue=64, runtime="auto",
        cache_dir=cache, max_batch_size=8, precision="auto", requests=requests,
    )  # fmt: skip
    photo = images()["chelsea_451x300"]
    rates: dict[str, list[float]] = {"int8": [], other: []}
    pss: list[float] = []
    for precision in ("int8", other, other, "int8"):
        server = Server(checkpoint, args, API_PRECISION=precision, API_EVAL_DIR=str(eval_dir))
        try:
            asyncio.run(load(server.url, photo, 4, 16))  # warm
            row = asyncio.run(load(server.url, photo, 16, requests))
            assert row["statuses"] == {"200": requests}, row["statuses"]
            rates[precision].append(row["images_per_s"])
            if precision == "int8":
                pss.append(server.pss_mb())
            print(f"  service {precision}: {row['images_per_s']:.1f} img/s (p50 {row['p50_ms']:.0f} ms)", flush=True)
        finally:
            server.stop()
    int8, base = statistics.median(rates["int8"]), statistics.median(rates[other])
    return {"int8_img_s": int8, f"{other}_img_s": base, "ratio": int8 / base, "int8_pss_mb": max(pss), "rates": rates}


def service_vs_model(checkpoint: Path, eval_dir: Path, cache: Path, requests: int, threads: int) -> dict[str, Any]:
    """INT8 resnet50: the service's img/s over the model's own at batch 8, alternated, medians."""
    from api.engine.model.measure.evaluation import time_runtimes

    group = Settings(_env_file=None, checkpoint_path=checkpoint, model_name="resnet50").model_group  # type: ignore[call-arg]
    settings = dataclasses.replace(group, device="cpu", eval_dir=eval_dir, cache_dir=cache, precision="int8")
    args = argparse.Namespace(
        model="resnet50", num_classes=67, image_size=224, device="cpu", max_queue=64, runtime="auto",
        cache_dir=cache, max_batch_size=8, precision="int8", requests=requests,
    )  # fmt: skip
    photo = images()["chelsea_451x300"]
    rates: dict[str, list[float]] = {"model": [], "service": []}
    for part in ("model", "service", "service", "model"):
        if part == "model":
            classifier = load_classifier(settings, threads=threads)
            spec = (classifier.runtime.name, classifier.runtime.precision)
            assert spec == ("openvino", "int8"), spec
            rate = statistics.median(
                time_runtimes({spec: classifier.runtime}, classifier.input_size, 8)[spec] for _ in range(5)
            )
            del classifier
        else:
            server = Server(checkpoint, args, API_EVAL_DIR=str(eval_dir))
            try:
                asyncio.run(load(server.url, photo, 4, 16))  # warm
                row = asyncio.run(load(server.url, photo, 16, requests))
                assert row["statuses"] == {"200": requests}, row["statuses"]
                rate = row["images_per_s"]
            finally:
                server.stop()
        rates[part].append(rate)
        print(f"  {part} int8: {rate:.1f} img/s", flush=True)
    model, service = statistics.median(rates["model"]), statistics.median(rates["service"])
    return {"model_img_s": model, "service_img_s": service, "ratio": service / model, "rates": rates}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet50,demo,efficientnet_b3,convnext_base")
    parser.add_argument("--requests", type=int, default=600, help="requests per service run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-service", action="store_true")
    parser.add_argument("--only-front-end-ratio", action="store_true", help="part 3 only (resnet50)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    stamped = stamp.stamp()
    print(stamp.line(stamped), flush=True)
    out: dict[str, Any] = {"stamp": stamped, "models": {}}
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        eval_dir = write_demo_eval(folder / "eval")
        cache = folder / "cache"
        checkpoints = {"demo": write_demo_model(folder / "demo")}
        for name, classes in ARCHITECTURES.items():
            (folder / name).mkdir()
            checkpoints[name] = write_checkpoint(folder / name, name, classes)
        if args.only_front_end_ratio:
            args.models, args.skip_service = "", True
        for name in filter(None, args.models.split(",")):
            print(f"measuring {name} ...", flush=True)
            architecture = None if name == "demo" else name
            out["models"][name] = measure(checkpoints[name], architecture, eval_dir, cache, args.threads)
        if out["models"]:
            print(model_tables(out["models"]), flush=True)
        if not args.skip_service:
            other = "bf16" if cpu_has_bf16() else "fp32"
            print(f"service: resnet50, API_PRECISION=int8 vs {other}, 16 connections", flush=True)
            service = service_ratio(checkpoints["resnet50"], eval_dir, cache, args.requests, other)
            out["service"] = service
            print(
                f"service: int8 {service['int8_img_s']:.1f} img/s, {other} {service[f'{other}_img_s']:.1f} img/s: "
                f"{service['ratio']:.2f}x (target >= 1.5x); INT8 service PSS {service['int8_pss_mb']:.0f} MB "
                "(target <= 1000)"
            )
        print("service vs model alone: resnet50 INT8, the model at batch 8, the service on 16 connections", flush=True)
        ratio = service_vs_model(checkpoints["resnet50"], eval_dir, cache, args.requests, args.threads)
        out["service_vs_model"] = ratio
        print(
            f"service vs model: {ratio['service_img_s']:.1f} vs {ratio['model_img_s']:.1f} img/s: "
            f"{ratio['ratio']:.2f}x (target >= 0.70x)"
        )
    target = ROOT / "artifacts" / "bench" / "precision.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(out, indent=1, default=str))
    print(f"written: {target.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
