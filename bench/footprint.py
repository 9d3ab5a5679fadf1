"""Start and memory per entry point: ready seconds with a warm model cache, peak PSS under load.

    python -m bench.footprint [--seconds 10] [--connections 16]      (part of make bench-frontend)

A resnet50 checkpoint (67 classes, OpenVINO at --precision: bf16 by default, as issue 28's baseline
was measured) is served once to fill the model cache; then each entry point users run is
started on that cache: `cat-breeds-api serve`, `uvicorn api.main:app` and Gunicorn with
api.gunicorn_conf. Ready: from the process start to GET /health answering 200. Memory: the proportional
set size (shared pages split between their sharers) of the whole process tree, front-ends and
engine, sampled from /proc every 50 ms while wrk posts a 451x300 JPEG on 16 connections.
Targets (issue 28): ready <= 5 s, peak PSS <= 1 GB, on every entry point.
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time
from pathlib import Path

from api.remote import entrypoints
from bench import stamp
from bench.frontend import arguments, load, requests_done, write_inputs, wrk_script
from tests.support import BIN, ServerProcess, cmdline, process_tree, tree_pss_mb

ENTRY_POINTS = {
    "cat-breeds-api serve": [str(BIN / "cat-breeds-api"), "serve"],
    "uvicorn api.main:app": [str(BIN / "uvicorn"), "api.main:app", "--port", "{port}"],
    "gunicorn": [str(BIN / "gunicorn"), "--config", "python:api.gunicorn_conf", "api.main:app"],
}
READY_TARGET_S, PSS_TARGET_MB = 5.0, 1024.0


def measure(command: list[str], env: dict[str, object], script: Path, *, seconds: float, connections: int) -> dict:
    """Ready seconds, PSS once ready, peak PSS under load, the processes and what imports torch."""
    run_dir = Path(tempfile.mkdtemp())
    started = time.monotonic()
    server = ServerProcess(command, run_dir, **env)
    try:
        server.wait_ready(300)
        ready_s = time.monotonic() - started
        idle = server.pss_mb()
        peak, done = idle, threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.wait(0.05):
                peak = max(peak, tree_pss_mb(server.pid))

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            output, elapsed = load(server.url + "/api/v1/predict", script, seconds, connections)
        finally:
            done.set()
            sampler.join()
        tree = process_tree(server.pid)
        with_torch = [_role(pid) for pid in tree if _maps_torch(pid)]
    finally:
        server.stop()
    return {
        "ready_s": ready_s,
        "pss_ready_mb": idle,
        "pss_peak_mb": peak,
        "img_s": requests_done(output.stdout) / elapsed,
        "processes": len(tree),
        "torch_in": with_torch,
    }


def _role(pid: int) -> str:
    command = cmdline(pid)
    return "engine" if entrypoints.ENGINE in command else "explainer" if entrypoints.EXPLAIN in command else "front-end"


def _maps_torch(pid: int) -> bool:
    """Whether the process has PyTorch's library mapped (imported torch)."""
    try:
        return "libtorch_cpu" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def main(argv: list[str] | None = None) -> None:
    parser = arguments(__doc__)
    parser.set_defaults(seconds=10.0)
    parser.add_argument("--precision", default="bf16", help="API_PRECISION (auto: fp32 without API_EVAL_DIR)")
    args = parser.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="bench-footprint-"))
    checkpoint, jpegs = write_inputs(folder)
    script = wrk_script(folder, jpegs["451x300"])
    env: dict[str, object] = {
        "API_CHECKPOINT_PATH": checkpoint, "API_CACHE_DIR": folder / "cache", "LOG_LEVEL": "INFO",
        "API_DEVICE": "cpu", "API_PRECISION": args.precision,
    }  # fmt: skip
    print("measured on: " + stamp.line())
    print(f"resnet50, 67 classes, OpenVINO, API_PRECISION={args.precision}")
    warm = measure(ENTRY_POINTS["cat-breeds-api serve"], env, script, seconds=2, connections=args.connections)
    print(f"cold start (fills the model cache): ready in {warm['ready_s']:.1f} s")
    print(
        "\n| entry point | ready, warm cache (s) | PSS ready (MB) | peak PSS, load (MB) | img/s | torch imported in |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for name, command in ENTRY_POINTS.items():
        row = measure(command, env, script, seconds=args.seconds, connections=args.connections)
        print(
            f"| {name} | {row['ready_s']:.2f} | {row['pss_ready_mb']:.0f} | {row['pss_peak_mb']:.0f} | "
            f"{row['img_s']:.0f} | {', '.join(row['torch_in']) or 'none'} |"
        )
    print(f"\ntargets: ready <= {READY_TARGET_S} s, peak PSS <= {PSS_TARGET_MB:.0f} MB on every entry point")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
