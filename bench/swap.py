"""A model swap under load at real size: what it costs the requests in flight.

    python -m bench.swap [--seconds 12] [--clients 4]      (make bench-swap)

Two resnet50 checkpoints (67 classes, random weights, the default model's shape), Gunicorn with two
front-ends and the engine process on 127.0.0.1 (API_RUNTIME=auto: the new model is converted and
timed beside the served one, as in production on a CPU). `--clients` threads post chelsea back to
back, one connection each; after `--seconds` the model is swapped with `cat-breeds-api reload`, then
the load runs `--seconds` more. Prints the answers by status, the versions each connection saw, the
call's figures and the latency before, during and after the swap; writes artifacts/bench/swap.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import skimage.data
import timm
import torch
from PIL import Image

from api.engine.model.files.labels import CAT_BREEDS
from bench import stamp
from tests.support import BIN, process_env, served_process

ADMIN_KEY = "bench-admin-key"
OUT = Path("artifacts/bench/swap.json")


def _checkpoints(folder: Path) -> tuple[Path, Path]:
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = timm.create_model("resnet50", pretrained=False, num_classes=len(CAT_BREEDS))
        path = folder / f"fold_{seed}.pt"
        torch.save(
            {"architecture": "resnet50", "state_dict": model.state_dict(), "class_names": list(CAT_BREEDS)}, path
        )
        paths.append(path)
    return paths[0], paths[1]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=12.0, help="load before and after the swap")
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        old, new = _checkpoints(folder)
        photo = folder / "chelsea.jpg"
        Image.fromarray(skimage.data.chelsea()).save(photo, quality=90)
        data = photo.read_bytes()
        command = [str(BIN / "gunicorn"), "--config", "python:api.gunicorn_conf", "api.main:app"]
        env: dict[str, object] = {
            "API_CHECKPOINT_PATH": old,
            "API_ADMIN_KEY": ADMIN_KEY,
            "WEB_CONCURRENCY": 2,
            "XDG_CACHE_HOME": folder,  # nothing cached: the new model is converted and timed, as the first time
        }
        with served_process(command, folder, ready=True, **env) as server:
            rows: list[tuple[str, float, float, int, str]] = []  # client, sent, seconds, status, version
            stop = threading.Event()

            def client(name: str) -> None:
                with httpx.Client(base_url=server.url, timeout=60) as session:
                    while not stop.is_set():
                        sent = time.monotonic()
                        response = session.post("/api/v1/predict", files={"file": ("chelsea.jpg", data)})
                        ok = response.status_code == 200
                        version = response.json()["model"]["version"] if ok else response.text[:80]
                        rows.append((name, sent, time.monotonic() - sent, response.status_code, version))

            threads = [threading.Thread(target=client, args=(f"c{n}",)) for n in range(args.clients)]
            for thread in threads:
                thread.start()
            time.sleep(args.seconds)
            called = time.monotonic()
            reload = subprocess.run(
                [str(BIN / "cat-breeds-api"), "reload", str(new), "--url", server.url],
                env=process_env(API_ADMIN_KEY=ADMIN_KEY),
                capture_output=True,
                text=True,
            )
            answered = time.monotonic()
            time.sleep(args.seconds)
            stop.set()
            for thread in threads:
                thread.join()

    phases = {
        "before": [r[2] for r in rows if r[1] < called],
        "during": [r[2] for r in rows if called <= r[1] <= answered],
        "after": [r[2] for r in rows if r[1] > answered],
    }
    switches = {}
    for name in sorted({r[0] for r in rows}):
        versions = [r[4] for r in rows if r[0] == name]
        switches[name] = [v for i, v in enumerate(versions) if i == 0 or versions[i - 1] != v]
    latency = {
        phase: {"requests": len(v), "p50": _percentile(v, 0.5), "p99": _percentile(v, 0.99), "max": _percentile(v, 1.0)}
        for phase, v in phases.items()
    }
    report = {
        "reload": (reload.stdout or reload.stderr).strip(),
        "call_s": round(answered - called, 3),
        "statuses": dict(Counter(str(r[3]) for r in rows)),
        "versions_per_connection": switches,
        "latency_ms": latency,
    }
    print(report["reload"])
    print(f"call {report['call_s']}s; answers by status {report['statuses']}")
    for phase, f in latency.items():
        print(
            f"{phase:>6}: {f['requests']} requests, p50 {f['p50']:.0f} ms, p99 {f['p99']:.0f} ms, max {f['max']:.0f} ms"
        )
    print("versions each connection saw:", {name: len(seen) for name, seen in switches.items()})
    OUT.parent.mkdir(parents=True, exist_ok=True)
    report["stamp"] = measured_on = stamp.stamp()
    print("measured on: " + stamp.line(measured_on))
    OUT.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
