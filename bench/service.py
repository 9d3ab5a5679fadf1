"""The service under load: `cat-breeds-api serve` (or Gunicorn) on 127.0.0.1, a lean HTTP/1.1 client."""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np

from bench.results import LevelResult
from tests.support import free_port, scrape, tree_mb, tree_pss_mb

ROOT = Path(__file__).resolve().parents[1]


class Server:
    def __init__(
        self, checkpoint: Path, args: argparse.Namespace, *, workers: int = 1, ready_timeout_s: float = 120, **env: str
    ):
        self.port = free_port()
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
        self.cold_start_s = self._wait_ready(started, ready_timeout_s)

    def _wait_ready(self, started: float, timeout_s: float) -> float:
        while time.perf_counter() - started < timeout_s:
            if self.process.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"server exited:\n{self.log.read().decode()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200 and self._all_workers_ready():
                    return time.perf_counter() - started
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"server not ready after {timeout_s:.0f} s")

    def _all_workers_ready(self) -> bool:
        """Under Gunicorn /health is one worker's answer; the ready gauge is the least ready worker's."""
        if self.workers == 1:
            return True
        return scrape(self.url).get("cat_breeds_api_model_ready") == 1

    def pss_mb(self) -> float:
        return tree_pss_mb(self.process.pid)

    def peak_rss_mb(self) -> float:
        """Peak resident memory of the server and its workers (VmHWM: exact, counts shared libraries whole)."""
        return tree_mb(self.process.pid, "VmHWM")

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


async def load(url: str, data: bytes, concurrency: int, total: int) -> LevelResult:
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
) -> list[LevelResult]:
    asyncio.run(load(server.url, data, 4, 8))  # warm the connection pool and the server
    results: list[LevelResult] = []
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
    found = scrape(url)
    return (
        found["cat_breeds_api_inference_duration_seconds_sum"],
        found["cat_breeds_api_inference_batch_size_count"],
        found["cat_breeds_api_inference_batch_size_sum"],
    )
