"""Front-end-bound bench: `API_RUNTIME=null` (no forward pass), so HTTP, multipart, decoding, the IPC
and the batch loop are all that costs. Runs on a 2-CPU machine; reports CPU per image per process.

    python -m bench.frontend [--seconds 8] [--connections 16] [--repeat 1]     (make bench-frontend)

1. The engine loop's own ceiling: a feeder (no HTTP, no decoding) keeps jobs in the engine's queue
   through a shared-memory ring, as a front-end does; img/s and the engine's CPU per image.
2. The service over HTTP (Gunicorn, WEB_CONCURRENCY front-ends, one engine), driven by wrk on
   127.0.0.1: 451x300 and 1600x1066 JPEGs, resize on the engine (API_PREPROCESS=auto, the default)
   and in the front-end (API_PREPROCESS=frontend), with 1 and 2 front-ends. CPU milliseconds per
   image, read from /proc (utime + stime) for the front-ends and the engine separately.
3. Where one front-end's CPU goes, per image and step, for both photos (bench/breakdown.py: py-spy's
   samples of the event loop, the decode threads' steps timed on their own CPU clock), with the same
   service resizing in the front-end beside it.

On 2 cores img/s measures the machine, not the design; the costs per image are what carry over to a
16-CPU GPU host (front-ends = CPUs - 2 there).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import skimage.data
import torch
from PIL import Image

from api.engine.images.recipe import Recipe
from api.remote import entrypoints
from bench import breakdown, stamp
from tests.support import BIN, ServerProcess, cmdline, cpu_s, engine_pids, parse_metrics, process_tree, scrape

IMAGES = {"451x300": (451, 300), "1600x1066": (1600, 1066)}
TARGETS = {  # the issues', for the report: the default layout (API_PREPROCESS=auto)
    ("451x300", "auto"): 2.0,
    ("1600x1066", "auto"): 4.0,
}


def write_inputs(folder: Path) -> tuple[Path, dict[str, Path]]:
    """A resnet50 checkpoint (its real timm recipe: bicubic, crop 0.95, 224) and the two JPEGs."""
    import timm

    checkpoint = folder / "resnet50.pt"
    model = timm.create_model("resnet50", pretrained=False, num_classes=67)
    torch.save({"architecture": "resnet50", "state_dict": model.state_dict()}, checkpoint)
    photo = Image.fromarray(skimage.data.chelsea())
    jpegs = {}
    for name, size in IMAGES.items():
        jpegs[name] = folder / f"{name}.jpg"
        photo.resize(size, Image.Resampling.LANCZOS).save(jpegs[name], quality=90)
    return checkpoint, jpegs


# --- 1. the engine loop, fed without HTTP ---------------------------------------------------------------


def feed(checkpoint: Path, seconds: float, in_flight: int = 512) -> dict[str, float]:
    from api.config import load_settings
    from api.remote import messages, wire
    from api.remote.entrypoints import EngineConfig
    from api.remote.frontend.spawner import EngineSpawner

    settings = load_settings(
        checkpoint_path=checkpoint, runtime="null", device="cpu", max_batch_size=64, max_queue=in_flight,
        cache_dir=Path(tempfile.mkdtemp()),
    )  # fmt: skip
    address = wire.address(f"bench-{os.getpid()}", "cpu")
    spawner = EngineSpawner(
        address,
        EngineConfig.from_settings(settings, linger_s=0.0, log_level="WARNING", log_dir=None),
    )
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    while True:
        try:
            sock.connect(address)
            break
        except ConnectionRefusedError:
            spawner()
            time.sleep(0.05)
    hello, _ = wire.receive(sock)
    assert isinstance(hello, messages.Hello), hello
    height, width = hello.model.recipe.crop
    layout = wire.Layout(hello.pixel_bytes, hello.model.served.num_classes)
    ring = wire.Ring.create(in_flight, layout)
    rng = np.random.default_rng(0)
    for slot in range(in_flight):
        ring.pixels(slot, height, width)[...] = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    wire.send(sock, messages.Attach(in_flight, layout.pixel_bytes, layout.classes), fds=(ring.fd,))
    assert spawner.process is not None
    engine = spawner.process.pid

    def send(slots: np.ndarray, first_id: int) -> None:
        records = np.zeros(len(slots), dtype=messages.JOB)
        records["id"] = np.arange(first_id, first_id + len(slots))
        records["slot"], records["height"], records["width"] = slots, height, width
        records["deadline"] = time.monotonic() + 60
        for message in messages.jobs(hello.model.generation, records):  # the model the engine serves
            wire.send(sock, message)

    def replies() -> np.ndarray:
        while True:  # heartbeats come between the replies
            message, _ = wire.receive(sock)
            if isinstance(message, messages.Replies):
                return message.rows()

    def run(duration: float) -> tuple[int, float, float]:
        sent = done = 0
        send(np.arange(in_flight), 0)
        sent = in_flight
        cpu0, began = cpu_s(engine), time.perf_counter()
        while time.perf_counter() - began < duration:
            answered = replies()
            done += len(answered)
            send(answered["slot"].copy(), sent)
            sent += len(answered)
        elapsed, cpu = time.perf_counter() - began, cpu_s(engine) - cpu0
        while done < sent:  # drain what is still in flight
            done += len(replies())
        return done - in_flight, elapsed, cpu

    run(1.0)  # warm-up
    images, elapsed, cpu = run(seconds)
    wire.send(sock, messages.MetricsAsk())
    while not isinstance(message := wire.receive(sock)[0], messages.Metrics):
        pass
    figures = parse_metrics(message.text.decode())
    forward_s = figures["cat_breeds_api_inference_duration_seconds_sum"]
    batches = figures["cat_breeds_api_inference_batch_size_count"]
    total = figures["cat_breeds_api_inference_batch_size_sum"]
    sock.close()
    spawner.wait(30)
    return {
        "img_s": images / elapsed,
        "engine_us_per_image": cpu / images * 1e6,
        "forward_us_per_image": forward_s / max(total, 1) * 1e6,
        "mean_batch": total / max(batches, 1),
    }


# --- 2. the service over HTTP --------------------------------------------------------------------------


def post_script(folder: Path, name: str, body: bytes, headers: dict[str, str]) -> Path:
    """A wrk script POSTing `body` (any bytes) with `headers` on every request."""
    (folder / f"{name}.body").write_bytes(body)
    script = folder / f"{name}.lua"
    script.write_text(
        f'wrk.method = "POST"\nlocal f = io.open("{folder / name}.body", "rb")\nwrk.body = f:read("*all")\n'
        "f:close()\n" + "".join(f'wrk.headers["{key}"] = "{value}"\n' for key, value in headers.items())
    )
    return script


def wrk_script(folder: Path, jpeg: Path) -> Path:
    """/api/v1/predict's multipart upload of `jpeg`."""
    boundary = "catbreedsbench"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="cat.jpg"\r\n'
        f"Content-Type: image/jpeg\r\n\r\n".encode()
        + jpeg.read_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return post_script(folder, jpeg.stem, body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})


def load(url: str, script: Path, seconds: float, connections: int) -> tuple[subprocess.CompletedProcess[str], float]:
    """wrk on `url` with `script` for `seconds`: its output and the seconds it took."""
    command = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "-s", str(script), url]
    started = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    return done, time.perf_counter() - started


def requests_done(wrk_output: str) -> int:
    """The requests wrk completed, from its summary ("12345 requests in 8.00s, ...")."""
    return int(next(line for line in wrk_output.splitlines() if "requests in" in line).split()[0])


def arguments(doc: str | None) -> argparse.ArgumentParser:
    """The benches' shared options: how long each load runs and how many connections it keeps."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--connections", type=int, default=16)
    return parser


def serve_and_measure(
    checkpoint: Path,
    script: Path,
    *,
    frontends: int,
    preprocess: str,
    seconds: float,
    connections: int,
    folder: Path,
    path: str = "/api/v1/predict",
    resize: str = "fast",
    profile: Path | None = None,
    model: dict[str, str] | None = None,
) -> dict[str, float]:
    """One service's figures under wrk; with `profile`, py-spy records the (one) front-end during the
    measured load and writes its samples there. `model`: settings for a real forward pass (default: the
    null runtime on the CPU)."""
    command = [str(BIN / "gunicorn"), "--config", "python:api.gunicorn_conf", "api.main:app"]
    env = {
        "API_CHECKPOINT_PATH": checkpoint, "API_RUNTIME": "null", "API_DEVICE": "cpu", "API_PREPROCESS": preprocess,
        "WEB_CONCURRENCY": frontends, "API_MAX_QUEUE": 256, "API_MAX_BATCH_SIZE": 64, "LOG_LEVEL": "INFO",
        "API_RESIZE": resize,
        "API_CACHE_DIR": folder / "cache", "MALLOC_ARENA_MAX": 2, **(model or {}),
    }  # fmt: skip
    run_dir = Path(tempfile.mkdtemp(dir=folder))
    server = ServerProcess(command, run_dir, **env)
    try:
        server.wait_ready(180)
        load(server.url + path, script, 2, connections)  # warm-up
        tree = process_tree(server.pid)[1:]
        # the engine serving (a front-end that lost the race to start one leaves a short-lived extra)
        engine = max(engine_pids(server.pid), key=cpu_s)
        workers = [p for p in tree if "gunicorn" in cmdline(p) and entrypoints.ENGINE not in cmdline(p)]
        assert len(workers) == frontends, (workers, frontends)
        before = scrape(server.url)
        cpu0 = {pid: cpu_s(pid) for pid in [*workers, engine]}
        loop0 = sum(cpu_s(pid, pid) for pid in workers)  # each front-end's event loop runs on its main thread
        with contextlib.ExitStack() as stack:
            if profile is not None:
                pool = stack.enter_context(ThreadPoolExecutor(1))
                samples = pool.submit(breakdown.record, workers[0], seconds - 1, profile)
                stack.callback(samples.result)  # its errors surface after the load
            _, elapsed = load(server.url + path, script, seconds, connections)
        cpu1 = {pid: cpu_s(pid) for pid in [*workers, engine]}
        loop1 = sum(cpu_s(pid, pid) for pid in workers)
        after = scrape(server.url)
    finally:
        server.stop()
    key = "cat_breeds_api_images_total{outcome=ok}"
    images = after.get(key, 0) - before.get(key, 0)
    non_ok = sum(v for k, v in after.items() if k.startswith("cat_breeds_api_images_total") and k != key) - sum(
        v for k, v in before.items() if k.startswith("cat_breeds_api_images_total") and k != key
    )
    per = {pid: (cpu1[pid] - cpu0[pid]) / max(images, 1) * 1000 for pid in cpu0}
    frontend_ms = sum(per[p] for p in workers)
    busy = sum(cpu1[p] - cpu0[p] for p in cpu0) / elapsed
    return {
        "img_s": images / elapsed,
        "errors": non_ok,
        "frontend_ms_per_image": frontend_ms,
        # of which the event loop (HTTP, the body's framing, routing, the engine link); the rest is
        # the decode pool's threads (decode, resize + crop, the copy into shared memory)
        "frontend_loop_ms_per_image": (loop1 - loop0) / max(images, 1) * 1000,
        "engine_ms_per_image": per[engine],
        "cores_busy_servers": busy,
    }


def main(argv: list[str] | None = None) -> None:
    parser = arguments(__doc__)
    parser.add_argument("--skip-http", action="store_true")
    parser.add_argument("--skip-breakdown", action="store_true", help="no section 3 (it needs py-spy and ptrace)")
    parser.add_argument(
        "--frontends", default="1,2", help="front-end counts for section 2, e.g. 1,4,8,15 on a GPU host"
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs of each section-2 layout, round-robin; the median is printed"
    )
    parser.add_argument(
        "--model", default="", help="section 2 with a real forward pass, e.g. API_DEVICE=cuda,API_PRECISION=fp16"
    )
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.frontends.split(",")]
    model = dict(item.split("=", 1) for item in args.model.split(",") if item) or None
    if model is not None:
        model.setdefault("API_RUNTIME", "auto")
    folder = Path(tempfile.mkdtemp(prefix="bench-frontend-"))
    checkpoint, jpegs = write_inputs(folder)
    print("measured on: " + stamp.line())
    print(
        f"CPU: {os.cpu_count()} visible; {'resnet50 with ' + args.model if model else 'null runtime'}, resnet50's "
        "recipe (224, bicubic, crop 0.95)"
    )
    fed = feed(checkpoint, args.seconds)
    print(
        f"\nengine loop, fed without HTTP: {fed['img_s']:,.0f} img/s (target >= 16,000); engine CPU "
        f"{fed['engine_us_per_image']:.1f} us/img of which the null forward pass {fed['forward_us_per_image']:.1f} us "
        f"(overhead {fed['engine_us_per_image'] - fed['forward_us_per_image']:.1f} us, target <= 60); "
        f"mean batch {fed['mean_batch']:.1f}"
    )
    if args.skip_http:
        return
    layouts = [
        (name, preprocess, frontends) for name in IMAGES for preprocess in ("auto", "frontend") for frontends in counts
    ]
    runs: dict[tuple[str, str, int], list[dict[str, float]]] = {layout: [] for layout in layouts}
    for _ in range(args.repeat):  # round-robin, so that the machine's drift falls on every layout alike
        for name, preprocess, frontends in layouts:
            runs[name, preprocess, frontends].append(
                serve_and_measure(
                    checkpoint,
                    wrk_script(folder, jpegs[name]),
                    frontends=frontends,
                    preprocess=preprocess,
                    seconds=args.seconds,
                    connections=max(args.connections, 4 * frontends),
                    folder=folder,
                    model=model,
                )
            )
    spread = f" (median of {args.repeat}, min-max)" if args.repeat > 1 else ""
    print(
        f"\n| image | resize in | front-ends | img/s | front-end CPU ms/img{spread} | engine CPU ms/img | cores busy "
        "| target |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    rows = []
    for layout in layouts:
        measured = runs[layout]
        row = {key: statistics.median(run[key] for run in measured) for key in measured[0]}
        rows.append((*layout, row))
        name, preprocess, frontends = layout
        costs = [run["frontend_ms_per_image"] for run in measured]
        ranged = f" ({min(costs):.3f}-{max(costs):.3f})" if len(costs) > 1 else ""
        target = TARGETS.get((name, preprocess))
        print(
            f"| {name} | {preprocess} | {frontends} | {row['img_s']:.0f} | "
            f"{row['frontend_ms_per_image']:.3f}{ranged} | "
            f"{row['engine_ms_per_image']:.3f} | {row['cores_busy_servers']:.2f} | "
            f"{'<= ' + str(target) + ' ms' if target else ''} |"
            + (f" ({row['errors']:.0f} errors)" if row["errors"] else "")
        )
    print(f"\nscaling, {counts[0]} -> more front-ends (target: front-end CPU/img changes <= 10 %):")
    for index in range(0, len(rows), len(counts)):
        one = rows[index][3]
        for name, preprocess, frontends, more in rows[index + 1 : index + len(counts)]:
            change = more["frontend_ms_per_image"] / one["frontend_ms_per_image"] - 1
            engine = more["engine_ms_per_image"] / max(one["engine_ms_per_image"], 1e-9) - 1
            print(
                f"  {name} resize in {preprocess}, {frontends} front-ends: "
                f"front-end {change:+.1%}, engine {engine:+.1%}"
            )
    if not args.skip_breakdown:
        print_breakdown(checkpoint, jpegs, folder, seconds=args.seconds, connections=args.connections)


def print_breakdown(
    checkpoint: Path, jpegs: dict[str, Path], folder: Path, *, seconds: float, connections: int
) -> None:
    """Section 3: one front-end, per photo: the default layout (the engine resizes) profiled step by
    step, beside the resize in the front-end (API_PREPROCESS=frontend, API_RESIZE=fast)."""
    from api.config import load_settings

    recipe = _resnet50_recipe()
    options = load_settings().batching_group
    for name, jpeg in jpegs.items():
        script = wrk_script(folder, jpeg)
        figures = {}
        for preprocess in ("frontend", "auto"):
            figures[preprocess] = serve_and_measure(
                checkpoint, script, frontends=1, preprocess=preprocess, seconds=max(seconds, 6),
                connections=connections, folder=folder,
                profile=folder / f"{name}.spy" if preprocess == "auto" else None,
            )  # fmt: skip
        default, frontend = figures["auto"], figures["frontend"]
        print(
            f"\n{name}, one front-end: CPU per image {default['frontend_ms_per_image']:.3f} ms where the engine "
            f"resizes (the default; target <= {TARGETS[name, 'auto']} ms), "
            f"engine {default['engine_ms_per_image']:.3f} ms; "
            f"{frontend['frontend_ms_per_image']:.3f} ms where the front-end resizes, engine "
            f"{frontend['engine_ms_per_image']:.3f} ms; {default['img_s']:.0f} vs {frontend['img_s']:.0f} img/s"
        )
        shares = breakdown.loop_shares((folder / f"{name}.spy").read_text().splitlines())
        loop_ms = default["frontend_loop_ms_per_image"]
        data = jpeg.read_bytes()
        steps = breakdown.decode_steps(data, recipe, options, ship=True)
        inline = breakdown.decoded_inline(data, recipe, options)
        print(f"decoded {'on the event loop' if inline else 'in the decode pool'} (api/remote/frontend/link.py)")
        print(breakdown.table(loop_ms, shares, default["frontend_ms_per_image"] - loop_ms, steps, inline=inline))


def _resnet50_recipe() -> Recipe:
    """The recipe a front-end gets for the bench's resnet50 (timm's eval transform, split)."""
    import timm

    from api.engine.model.preprocess import build_transform, split_transform

    transform, _ = build_transform(timm.create_model("resnet50", num_classes=67), image_size=None)
    recipe = split_transform(transform)
    assert recipe is not None
    return recipe


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
