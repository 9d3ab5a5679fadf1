"""Service throughput and latency against the in-process ceiling, measured in one run.

    make bench            # or: .venv/bin/python -m bench.run --help

1. The ceiling: the service's own pipeline object (`api.engine.service.Engine`: decode pool,
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
import asyncio
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import skimage.data
import timm
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from api.config import load_settings
from api.engine.batching import IDLE_TRIM_S
from api.engine.cpu import cpu_budget
from api.engine.labels import CAT_BREEDS
from api.engine.service import Engine

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


# --- in-process ceiling ----------------------------------------------------------------------------


class Ceiling:
    """The service's own pipeline object (api.engine.service.Engine) called in-process: decode pool,
    batcher, runtime and ranking, everything but HTTP. The best the service could do.

    The machine's speed drifts by several percent over minutes, so the ceiling is not measured once
    and compared with service runs minutes later: after the sweep over concurrency, the best level
    is measured again, 3x longer (the best of a noisy sweep alone is biased upwards), and again after
    every service level (`resample`, while the service is idle), with the batch-1 latency; ratios use
    the medians of those samples.
    """

    def __init__(self, checkpoint: Path, args: argparse.Namespace):
        self.args = args
        settings = load_settings(
            _env_file=None,
            checkpoint_path=checkpoint,
            model_name=args.model,
            num_classes=args.num_classes,
            image_size=args.image_size,
            device=args.device,
            runtime=args.runtime,
            precision=args.precision,
            max_batch_size=args.max_batch_size,  # the service's: the same runtime choice, the same batches
            max_queue=max(args.ceiling_batches) * 2,
            cache_dir=args.cache_dir,
        )
        self.engine = Engine.start(settings.model_group, settings.batching_group)
        self.classifier = self.engine.classifier
        self.pipeline = f"the service's engine in-process, {self.engine.cpu.describe()}"

    def _run(self, data: bytes, concurrency: int, images: int) -> float:
        """`images` classifications, `concurrency` at a time, through the engine: images/s."""

        async def worker(count: int) -> None:
            for _ in range(count):
                await self.engine.classify_all([data], top_k=5)

        async def main() -> None:
            share = max(1, images // concurrency)
            await asyncio.gather(*(worker(share) for _ in range(concurrency)))

        started = time.perf_counter()
        asyncio.run(main())
        return max(1, images // concurrency) * concurrency / (time.perf_counter() - started)

    def _rate(self, data: bytes, concurrency: int, images: int, *, reduced: bool) -> float:
        return self._run(data, concurrency, images)

    def measure(self, data: bytes, *, reduced: bool) -> dict:
        """Sweep the concurrency, re-measure the best, time the forward pass alone and the batch-1 latency."""
        args = self.args
        sweep = {}
        for level in args.ceiling_batches:
            self._run(data, level, level)  # warm this level
            sweep[level] = self._rate(data, level, max(args.ceiling_images, 2 * level), reduced=reduced)
        level = max(sweep, key=sweep.__getitem__)
        samples = [self._rate(data, level, 3 * args.ceiling_images, reduced=reduced)]
        # the forward pass alone at the largest batch: what the service's inference thread is compared with
        batch = args.max_batch_size
        _, pixels = self.engine.prepare(data)
        rounds = max(1, args.ceiling_images // batch)
        started = time.perf_counter()
        for _ in range(rounds):
            self.classifier.forward([pixels] * batch)
        forward_ms = 1000 * (time.perf_counter() - started) / (rounds * batch)
        latencies = self._latencies_ms(data, reduced=reduced)
        return {
            "images_per_s": samples[0],
            "samples": samples,
            "batch": level,
            "sweep": sweep,
            "forward_ms_per_image": forward_ms,
            "batch1_p50_ms": statistics.median(latencies),
            "batch1_ms": latencies,
            "reduced": reduced,
            "pipeline": self.pipeline,
            "runtime": self.classifier.describe()["runtime"],
            "precision": self.classifier.describe()["precision"],
            "runtime_reason": self.classifier.runtime_reason,
        }

    def _latencies_ms(self, data: bytes, *, reduced: bool) -> list[float]:
        latencies = []
        for _ in range(self.args.latency_samples):
            started = time.perf_counter()
            asyncio.run(self.engine.classify_all([data], top_k=5))
            latencies.append(1000 * (time.perf_counter() - started))
        return latencies

    def resample(self, data: bytes, result: dict) -> None:
        """One more sample of the best level and of the batch-1 latency; both become medians."""
        result["samples"].append(
            self._rate(data, result["batch"], 3 * self.args.ceiling_images, reduced=result["reduced"])
        )
        result["images_per_s"] = statistics.median(result["samples"])
        result["batch1_ms"] += self._latencies_ms(data, reduced=result["reduced"])
        result["batch1_p50_ms"] = statistics.median(result["batch1_ms"])

    def close(self) -> None:
        self.engine.close()


# --- the service -----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pss_mb(pid: int) -> float:
    total = 0
    for child in [pid, *_children(pid)]:
        try:
            for line in Path(f"/proc/{child}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def _children(pid: int) -> list[int]:
    try:
        kids = [int(k) for k in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
    return kids + [g for k in kids for g in _children(k)]


class Server:
    def __init__(self, checkpoint: Path, args: argparse.Namespace, *, workers: int = 1, **env: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workers = workers
        environment = {k: v for k, v in os.environ.items() if not k.startswith("API_")}
        environment.update(
            API_CHECKPOINT_PATH=str(checkpoint), API_MODEL_NAME=args.model, API_NUM_CLASSES=str(args.num_classes),
            API_IMAGE_SIZE=str(args.image_size), API_DEVICE=args.device, API_PORT=str(self.port),
            API_MAX_QUEUE=str(args.max_queue), API_PRECISION=args.precision, API_RUNTIME=args.runtime,
            API_CACHE_DIR=str(args.cache_dir),
            API_MAX_BATCH_SIZE=str(args.max_batch_size), LOG_LEVEL="WARNING",
            WEB_CONCURRENCY=str(workers), MALLOC_ARENA_MAX="2",  # the arena cap: as image and make run
        )  # fmt: skip
        environment.update(env)  # --server-env wins
        # `python -m`: the same as the `gunicorn` and `cat-breeds-api` scripts, with or without an install
        if workers > 1:
            environment["API_HOST"] = "127.0.0.1"
            command = [sys.executable, "-m", "gunicorn", "--config", "python:api.gunicorn_conf", "api.main:app"]
        else:
            command = [sys.executable, "-m", "api.cli", "serve"]
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop())
        started = time.perf_counter()
        self.process = subprocess.Popen(command, env=environment, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)
        self.cold_start_s = self._wait_ready(started)

    def _wait_ready(self, started: float) -> float:
        while time.perf_counter() - started < 120:
            if self.process.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"server exited:\n{self.log.read().decode()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200 and self._all_workers_ready():
                    return time.perf_counter() - started
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError("server not ready after 120 s")

    def _all_workers_ready(self) -> bool:
        """Under Gunicorn /health is one worker's answer; the ready gauge is the least ready worker's."""
        if self.workers == 1:
            return True
        text = httpx.get(self.url + "/metrics", timeout=1).text
        return any(
            line.startswith("cat_breeds_api_model_ready ") and float(line.split()[-1]) == 1
            for line in text.splitlines()
        )

    def pss_mb(self) -> float:
        return _pss_mb(self.process.pid)

    def peak_rss_mb(self) -> float:
        """Peak resident memory of the server and its workers (VmHWM: exact, counts shared libraries whole)."""
        total = 0
        for pid in [self.process.pid, *_children(self.process.pid)]:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            total += next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
        return total / 1024

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)
        self.log.close()


def _multipart_request(port: int, data: bytes) -> bytes:
    """One complete HTTP/1.1 request (multipart field `file`), encoded once and sent as is."""
    boundary = "cat-breeds-api-bench"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="img.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    head = (
        f"POST /api/v1/predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> tuple[int, bool]:
    """Send one request, read its whole response; (status, whether the connection stays open)."""
    writer.write(request)
    await writer.drain()
    status = int((await reader.readline()).split()[1])
    length, keep_alive = 0, True
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        if name.lower() == "content-length":
            length = int(value)
        elif name.lower() == "connection" and value.strip().lower() == "close":
            keep_alive = False
    await reader.readexactly(length)
    return status, keep_alive


async def load(url: str, data: bytes, concurrency: int, total: int) -> dict[str, float]:
    """`total` requests from `concurrency` keep-alive connections; images/s of 200s and latency percentiles.

    A minimal HTTP/1.1 client (the request is encoded once): on this 2-core machine the load
    generator shares the CPU with the server, and a full client library would cost the measured
    service several percent of its throughput.
    """
    port = int(url.rsplit(":", 1)[1])
    request = _multipart_request(port, data)
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    remaining = total

    async def client() -> None:
        nonlocal remaining
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while remaining > 0:
                remaining -= 1
                started = time.perf_counter()
                status, keep_alive = await _exchange(reader, writer, request)
                elapsed = time.perf_counter() - started
                statuses[str(status)] = statuses.get(str(status), 0) + 1
                if status == 200:
                    latencies.append(elapsed)
                if not keep_alive:
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    ms = np.array(latencies) * 1000 if latencies else np.array([float("nan")])
    return {
        "concurrency": concurrency,
        "requests": total,
        "images_per_s": len(latencies) / wall,
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "statuses": statuses,
    }


def sweep(
    server: Server,
    data: bytes,
    args: argparse.Namespace,
    levels: list[int],
    after_level: Callable[[], None] | None = None,
) -> list[dict[str, float]]:
    asyncio.run(load(server.url, data, 4, 8))  # warm the connection pool and the server
    results = []
    for concurrency in levels:
        total = max(args.requests, concurrency * 2)
        before = _inference_counters(server.url)
        row = asyncio.run(load(server.url, data, concurrency, total))
        after = _inference_counters(server.url)
        seconds, passes, images = (after[i] - before[i] for i in range(3))
        # where the time went: how busy the inference thread was, and what a forward pass cost per image
        row["inference_busy"] = seconds * row["images_per_s"] / max(row["requests"], 1)
        row["mean_batch"] = images / max(passes, 1)
        row["forward_ms_per_image"] = 1000 * seconds / max(images, 1)
        results.append(row)
        if after_level is not None:
            after_level()
    return results


def _inference_counters(url: str) -> tuple[float, float, float]:
    """Forward-pass seconds, passes and images so far, from the service's own /metrics."""
    found = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for sample in family.samples:
            found[sample.name] = sample.value
    return (
        found["cat_breeds_api_inference_duration_seconds_sum"],
        found["cat_breeds_api_inference_batch_size_count"],
        found["cat_breeds_api_inference_batch_size_sum"],
    )


# --- report ----------------------------------------------------------------------------------------


def _table(name: str, ceil: dict[str, float], rows: list[dict[str, float]]) -> str:
    lines = [
        f"\n{name}: in-process ceiling {ceil['images_per_s']:.2f} img/s (median of {len(ceil['samples'])} samples, "
        f"{min(ceil['samples']):.2f}-{max(ceil['samples']):.2f}; batch {ceil['batch']}, {ceil['pipeline']}; forward "
        f"{ceil['forward_ms_per_image']:.2f} ms/img), batch-1 pipeline p50 {ceil['batch1_p50_ms']:.1f} ms",
        f"{'conc':>5} {'img/s':>8} {'x ceil':>7} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'p50/b1':>7} "
        f"{'busy':>5} {'batch':>5} {'fwd/img':>7} {'PSS MB':>7}  statuses",
    ]
    for row in rows:
        lines.append(
            f"{row['concurrency']:>5} {row['images_per_s']:>8.2f} {row['images_per_s'] / ceil['images_per_s']:>7.2f} "
            f"{row['p50_ms']:>8.1f} {row['p90_ms']:>8.1f} {row['p99_ms']:>8.1f} "
            f"{row['p50_ms'] / ceil['batch1_p50_ms']:>7.2f} {row['inference_busy']:>5.0%} {row['mean_batch']:>5.1f} "
            f"{row['forward_ms_per_image']:>5.1f}ms {row.get('service_pss_mb', float('nan')):>7.0f}  {row['statuses']}"
        )
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name, entry in results["images"].items():
        rows = entry["service"]
        axis.plot([r["p99_ms"] for r in rows], [r["images_per_s"] for r in rows], marker="o", label=name)
        for row in rows:
            axis.annotate(f"c={row['concurrency']}", (row["p99_ms"], row["images_per_s"]), fontsize=7)
        axis.axhline(entry["ceiling"]["images_per_s"], linestyle="--", linewidth=0.8, color=axis.lines[-1].get_color())
    axis.set_xscale("log")
    axis.set_xlabel("p99 latency (ms, log)")
    axis.set_ylabel("images/s")
    axis.set_title(f"{results['model']} on {results['device']}: service vs in-process ceiling (dashed)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


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
        "--server-env", action="append", default=[], metavar="NAME=VALUE", help="extra environment for the service"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "artifacts" / "bench")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    # concurrency levels of the in-process ceiling
    args.ceiling_batches = [b for b in (1, 2, 4, 8, 16, 32, 64, 128) if b <= max(16, 2 * args.max_batch_size)]
    args.out.mkdir(parents=True, exist_ok=True)
    photos = {name: data for name, data in images().items() if name in args.images.split(",")}
    results: dict = {
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
        print(_table(name, entry["ceiling"], entry["service"]))
    results["summary"] = summary = _summary(results)
    print("\nsummary: " + ", ".join(f"{k} {v:.2f}" for k, v in summary.items()))
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    plot(results, args.out / "throughput_vs_p99.png")
    print(f"wrote {args.out / 'results.json'} and {args.out / 'throughput_vs_p99.png'}")


def _summary(results: dict) -> dict[str, float]:
    """The README's targets, as ratios of the ceilings (and the extras, where they ran)."""
    summary: dict[str, float] = {}
    chelsea = results["images"].get("chelsea_451x300")
    if chelsea:
        ceiling, rows = chelsea["ceiling"], chelsea["service"]
        best = max((r["images_per_s"] for r in rows if r["concurrency"] <= 16), default=0.0)
        if best:
            summary["chelsea_saturated_x_ceiling"] = best / ceiling["images_per_s"]
        for row in rows:
            if row["concurrency"] == 64:
                summary["chelsea_c64_img_s"] = row["images_per_s"]
                summary["chelsea_c64_x_ceiling"] = row["images_per_s"] / ceiling["images_per_s"]
        summary["chelsea_ceiling_img_s"] = ceiling["images_per_s"]
        summary["chelsea_forward_only_img_s"] = 1000 / ceiling["forward_ms_per_image"]
        if rows[0]["concurrency"] == 1:
            summary["concurrency1_p50_x_batch1"] = rows[0]["p50_ms"] / ceiling["batch1_p50_ms"]
    big = results["images"].get("photo_1600x1066")
    if big:
        summary["large_jpeg_x_ceiling"] = (
            max(r["images_per_s"] for r in big["service"]) / big["ceiling"]["images_per_s"]
        )
    summary.update(
        cold_start_s=results["cold_start_s"],
        service_peak_pss_mb=results["service_pss_mb"],
        service_peak_rss_mb=results["service_peak_rss_mb"],
        service_idle_pss_mb=results["service_pss_idle_mb"],
    )
    if "reduced_decode_off" in results:
        big = results["images"]["photo_1600x1066"]
        chelsea = results["images"]["chelsea_451x300"]
        on16 = next(r for r in big["service"] if r["concurrency"] == 16)["images_per_s"]
        summary["large_jpeg_reduced_on_vs_off_c16"] = on16 / results["reduced_decode_off"][0]["images_per_s"]
        multi = results["multi_worker"]["service"][0]["images_per_s"]
        one = next(r for r in chelsea["service"] if r["concurrency"] == 16)["images_per_s"]
        summary["multi_worker_vs_one_worker_c16"] = multi / one
    return summary


if __name__ == "__main__":
    main()
