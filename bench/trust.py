"""Fold ensembles, calibration and explanations, in numbers: `python -m bench.trust` (make bench-trust).

1. Digits: the 3-fold resnet10t of tests/digits.py on its 360 held-out digits: each fold alone, the
   ensemble, and ECE / NLL before and after the fitted temperature (on the held-out part of the folder).
2. Ensemble throughput: `cat-breeds-api serve` with 3 resnet50 folds (67 classes, random weights) vs one
   of them, the same precision (bf16 where the CPU has it, else fp32; OpenVINO), 16 connections posting
   a 451x300 JPEG, alternated single, ensemble, ensemble, single (the machine drifts); the ratio of the
   medians (target >= 0.30) and each service's PSS against base + k x one fold's weights.
3. Five folds for the price of one: 5 resnet50 folds at API_PRECISION=int8 (calibrated on the demo's
   evaluation crops) vs one resnet50 at API_RUNTIME=torch API_PRECISION=fp32, alternated (target >= 1.0).
4. Explanations (the demo's real weights, chelsea): the latency of explain=true (p50, after the
   explaining process started), its own compute time and CPU seconds per image (from /proc), the
   explaining process's memory; predictions' p50/p99 under 16 connections alone and while another
   process asks for explanations back to back, at their limit (API_MAX_EXPLANATIONS=1), alternated.
   And Grad-CAM alone on one thread for resnet50, one fold and three (explain-cost).

Results: printed, and artifacts/bench/trust.json with the stamp.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import multiprocessing
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import httpx
import numpy as np
import timm
import torch

from api.engine.model.runtimes.base import cpu_has_bf16
from api.ops.demo import write_demo_eval, write_demo_model
from bench import stamp
from bench.results import LevelResult
from bench.run import images
from bench.service import Server, load
from tests.digits import IMAGE_SIZE, train_folds

ROOT = Path(__file__).resolve().parents[1]
TICKS = os.sysconf("SC_CLK_TCK")


def write_folds(folder: Path, architecture: str, classes: int, folds: int) -> Path:
    """`folds` checkpoints of `architecture` with different random weights, as k-fold training lays them out."""
    for k in range(folds):
        torch.manual_seed(k)
        model = timm.create_model(architecture, pretrained=False, num_classes=classes)
        (folder / f"fold_{k}").mkdir(parents=True)
        torch.save(
            {"architecture": architecture, "state_dict": model.state_dict()}, folder / f"fold_{k}" / "best_model.pt"
        )
    return folder


def load_model(checkpoint: Path, **values: Any) -> Any:
    """The classifier on the CPU, PyTorch fp32 unless told otherwise, as the tests load it."""
    from api.config import Settings
    from api.engine.model.loader import load_classifier

    group = Settings(_env_file=None, checkpoint_path=checkpoint).model_group  # type: ignore[call-arg]
    settings = dataclasses.replace(group, device="cpu", runtime="torch", precision="fp32", cache_dir=None)
    return load_classifier(dataclasses.replace(settings, **values))


def digits_figures(folder: Path) -> dict[str, Any]:
    digits = train_folds(folder)
    pixels = None
    alone = []
    for fold in sorted(digits.folds.iterdir()):
        classifier = load_model(fold / "best_model.pt", image_size=IMAGE_SIZE)
        if pixels is None:
            from PIL import Image

            pixels = [classifier.prepare(Image.fromarray(i).convert("RGB")) for i in digits.images]
        alone.append(
            np.concatenate([classifier.forward(pixels[i : i + 32]).numpy() for i in range(0, len(pixels), 32)])
        )
    folds = [round(float(np.mean(a.argmax(1) == digits.labels)), 4) for a in alone]
    ensemble = round(float(np.mean(np.mean(alone, axis=0).argmax(1) == digits.labels)), 4)
    calibrated = load_model(digits.folds, image_size=IMAGE_SIZE, eval_dir=digits.eval_dir, cache_dir=folder / "cache")
    calibration = calibrated.describe()["calibration"]
    keep = (
        "temperature",
        "fit_images",
        "held_out_images",
        "accuracy",
        "ece_before",
        "ece_after",
        "nll_before",
        "nll_after",
        "fold_accuracy",
    )
    return {"folds_alone_360": folds, "ensemble_360": ensemble, "calibration": {k: calibration[k] for k in keep}}


def _args(cache: Path, *, runtime: str = "auto", precision: str = "auto") -> argparse.Namespace:
    return argparse.Namespace(
        model="resnet50", num_classes=67, image_size=224, device="cpu", max_queue=64, runtime=runtime,
        cache_dir=cache, max_batch_size=8, precision=precision,
    )  # fmt: skip


def alternated(
    runs: dict[str, tuple[Path, argparse.Namespace, dict[str, str]]], order: list[str], requests: int
) -> dict[str, Any]:
    """Each configuration served in `order`, loaded by 16 connections; img/s and PSS per run."""
    photo = images()["chelsea_451x300"]
    rates: dict[str, list[float]] = {name: [] for name in runs}
    pss: dict[str, list[float]] = {name: [] for name in runs}
    for name in order:
        checkpoint, args, env = runs[name]
        server = Server(checkpoint, args, ready_timeout_s=1200.0, **cast(dict[str, Any], env))
        try:
            asyncio.run(load(server.url, photo, 4, 16))  # warm
            row = asyncio.run(load(server.url, photo, 16, requests))
            assert row["statuses"] == {"200": requests}, row["statuses"]
            rates[name].append(row["images_per_s"])
            pss[name].append(server.pss_mb())
            print(
                f"  {name}: {row['images_per_s']:.1f} img/s (p50 {row['p50_ms']:.0f} ms), PSS {pss[name][-1]:.0f} MB",
                flush=True,
            )
        finally:
            server.stop()
    return {
        "img_s": {name: statistics.median(values) for name, values in rates.items()},
        "pss_mb": {name: max(values) for name, values in pss.items()},
        "rates": rates,
    }


def _explainer_cpu_s() -> float:
    """CPU seconds (user + system) of the explaining process (the engine's child, which outlives the
    front-end that started it, so it is looked up by its command line), 0 before it started."""
    for pid in (int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()):
        try:
            if b"api.remote.host.explainer" in Path(f"/proc/{pid}/cmdline").read_bytes():
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                return (int(fields[11]) + int(fields[12])) / TICKS
        except OSError:
            continue
    return 0.0


def _keep_explaining(url: str, photo: bytes, stop: Any, count: Any) -> None:
    """Explanations back to back (at the limit of one), until `stop`."""
    with httpx.Client(timeout=120) as client:
        while not stop.is_set():
            answer = client.post(url, files={"file": ("chelsea.jpg", photo)})
            if answer.status_code == 200:
                with count.get_lock():
                    count.value += 1


def explanations(checkpoint: Path, cache: Path, requests: int, explains: int) -> dict[str, Any]:
    photo = images()["chelsea_451x300"]
    args = _args(cache)
    args.model, args.num_classes = "tf_efficientnet_lite0", 1000
    server = Server(
        checkpoint, args, ready_timeout_s=600, API_MAX_EXPLANATIONS="1", API_MODEL_NAME="", API_NUM_CLASSES=""
    )
    try:
        url = server.url + "/api/v1/predict?explain=true"

        def explain() -> dict[str, Any]:
            answer = httpx.post(url, files={"file": ("chelsea.jpg", photo)}, timeout=120)
            assert answer.status_code == 200, answer.text
            return answer.json()["explanation"]

        started = time.perf_counter()
        first = explain()  # starts the explaining process: PyTorch, the model read again
        first_s = time.perf_counter() - started
        cpu_before = _explainer_cpu_s()
        latencies, computes = [], []
        for _ in range(explains):
            started = time.perf_counter()
            answer = explain()
            latencies.append(time.perf_counter() - started)
            computes.append(answer["explain_ms"])
        cpu_per_image = (_explainer_cpu_s() - cpu_before) / explains
        asyncio.run(load(server.url, photo, 4, 16))  # warm
        runs: dict[str, list[LevelResult]] = {"alone": [], "beside": []}
        explained = 0
        for name in ("alone", "beside", "beside", "alone"):  # alternated: the machine drifts
            if name == "alone":
                runs[name].append(asyncio.run(load(server.url, photo, 16, requests)))
                continue
            # the explaining client is a process of its own, as another user would be (not this one's GIL)
            stop, count = multiprocessing.Event(), multiprocessing.Value("i", 0)
            client = multiprocessing.Process(target=_keep_explaining, args=(url, photo, stop, count))
            client.start()
            try:
                runs[name].append(asyncio.run(load(server.url, photo, 16, requests)))
            finally:
                stop.set()
                client.join()
            explained += count.value
        alone, beside = (
            {k: statistics.median(r[k] for r in runs[name]) for k in ("images_per_s", "p50_ms", "p99_ms")}
            for name in ("alone", "beside")
        )
        return {
            "first_explain_s": round(first_s, 2),
            "explain_p50_ms": round(1000 * statistics.median(latencies), 1),
            "explain_compute_p50_ms": round(statistics.median(computes), 1),
            "explain_cpu_s_per_image": round(cpu_per_image, 3),
            "explainer_memory_mb": first["memory_mb"],
            "layer": first["layer"],
            "predictions_alone": alone,
            "predictions_beside_explanations": beside,
            "explanations_during_load": explained,
        }
    finally:
        server.stop()


def explain_costs(folder: Path, repeats: int) -> dict[str, Any]:
    """Grad-CAM alone, on one thread as the explaining process runs it: resnet50 (67 classes), one fold and three."""
    from PIL import Image

    from api.config import Settings
    from api.engine.model.explain import load_explainer

    torch.set_num_threads(1)
    folds = write_folds(folder, "resnet50", 67, 3)
    photo = Image.open(__import__("io").BytesIO(images()["chelsea_451x300"])).convert("RGB")
    out = {}
    for name, path in (("resnet50, 1 fold", folds / "fold_0" / "best_model.pt"), ("resnet50, 3 folds", folds)):
        explainer = load_explainer(Settings(_env_file=None, checkpoint_path=path).model_group)  # type: ignore[call-arg]
        pixels = explainer.recipe.pixels(photo)
        explainer.explain(pixels, 0)
        seconds = [explainer.explain(pixels, 0).seconds for _ in range(repeats)]
        out[name] = {"p50_ms": round(1000 * statistics.median(seconds), 1), "layer": explainer.explain(pixels, 0).layer}
        print(f"  Grad-CAM {name}: p50 {out[name]['p50_ms']} ms on one thread", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=400, help="requests per service run")
    parser.add_argument("--explains", type=int, default=20)
    parser.add_argument("--parts", default="digits,ensemble,int8,explain,explain-cost")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    stamped = stamp.stamp()
    print(stamp.line(stamped), flush=True)
    out: dict[str, Any] = {"stamp": stamped}
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        cache = folder / "cache"
        if "digits" in parts:
            out["digits"] = digits = digits_figures(folder / "digits")
            c = digits["calibration"]
            print(
                f"digits (360 held out): folds alone {digits['folds_alone_360']}, ensemble {digits['ensemble_360']}; "
                f"T={c['temperature']}: ECE {c['ece_before']} -> {c['ece_after']}, NLL {c['nll_before']} -> "
                f"{c['nll_after']} ({c['held_out_images']} held out)",
                flush=True,
            )
        eval_dir = write_demo_eval(folder / "eval")
        if "ensemble" in parts:
            precision = "bf16" if cpu_has_bf16() else "fp32"
            folds = write_folds(folder / "three", "resnet50", 67, 3)
            fold_mb = (folds / "fold_0" / "best_model.pt").stat().st_size / (1 << 20)
            env = {"API_PRECISION": precision}
            single = (folds / "fold_0" / "best_model.pt", _args(cache, precision=precision), env)
            runs = {"single": single, "3 folds": (folds, _args(cache, precision=precision), env)}
            print(f"ensemble: 3 resnet50 folds vs one, OpenVINO {precision}, 16 connections", flush=True)
            result = alternated(runs, ["single", "3 folds", "3 folds", "single"], args.requests)
            result["ratio"] = result["img_s"]["3 folds"] / result["img_s"]["single"]
            result["fold_weights_mb"] = round(fold_mb, 1)
            result["pss_bound_mb"] = round(result["pss_mb"]["single"] + 2 * fold_mb, 1)
            out["ensemble"] = result
            pss = result["pss_mb"]
            print(
                f"ensemble: {result['ratio']:.2f}x the single fold (target >= 0.30); PSS {pss['3 folds']:.0f} MB vs "
                f"single {pss['single']:.0f} MB + 2 x {fold_mb:.0f} MB = {result['pss_bound_mb']:.0f} MB",
                flush=True,
            )
        if "int8" in parts:
            folds = write_folds(folder / "five", "resnet50", 67, 5)
            runs = {
                "torch fp32, 1 model": (
                    folds / "fold_0" / "best_model.pt",
                    _args(cache, runtime="torch", precision="fp32"),
                    {},
                ),
                "int8, 5 folds": (folds, _args(cache, precision="int8"), {"API_EVAL_DIR": str(eval_dir)}),
            }
            print("five folds at INT8 vs one resnet50 on PyTorch fp32, 16 connections", flush=True)
            result = alternated(
                runs, ["int8, 5 folds", "torch fp32, 1 model", "torch fp32, 1 model", "int8, 5 folds"], args.requests
            )
            result["ratio"] = result["img_s"]["int8, 5 folds"] / result["img_s"]["torch fp32, 1 model"]
            out["five_folds_int8"] = result
            print(f"five folds INT8: {result['ratio']:.2f}x one resnet50 on PyTorch fp32 (target >= 1.0)", flush=True)
        if "explain-cost" in parts:
            out["explain_cost"] = explain_costs(folder / "explain", args.explains)
        if "explain" in parts:
            demo = write_demo_model(folder / "demo")
            out["explain"] = result = explanations(demo, cache, args.requests, args.explains)
            print(f"explain (demo, chelsea): {json.dumps(result)}", flush=True)
    target = ROOT / "artifacts" / "bench" / "trust.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(out, indent=1, default=str))
    print(f"written: {target.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
