"""An HTTP load generator for the load tests, run in a process of its own.

A client inside the test process shares its interpreter with everything the suite has built up (a
heap whose garbage collections pause every coroutine), so its latencies would be partly its own.
Here it starts fresh, freezes what it imported, and reports how late its own event loop ran, so a
latency figure can be told apart from a stall in the client.

    python -m tests.loadgen closed URL IMAGE --concurrency 16 --seconds 4
    python -m tests.loadgen open URL IMAGE --rate 300 --seconds 5

Prints one JSON object: statuses, latencies of the 200s, 503s without Retry-After, wall time and
the client's worst event-loop lag.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

PREDICT = "/api/v1/predict"
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Outcome:
    statuses: dict[str, int] = field(default_factory=dict)
    latencies_200: list[float] = field(default_factory=list)
    missing_retry_after: int = 0
    wall_s: float = 0.0
    loop_lag_max_s: float = 0.0  # how late the client's own event loop ran a 5 ms timer, at worst

    def add(self, status: str, seconds: float, retry_after: str | None = None) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if status == "200":
            self.latencies_200.append(seconds)
        if status == "503" and not retry_after:
            self.missing_retry_after += 1


async def post(client: httpx.AsyncClient, url: str, data: bytes, outcome: Outcome) -> None:
    started = time.perf_counter()
    try:
        response = await client.post(url + PREDICT, files={"file": ("cat.jpg", data, "image/jpeg")})
    except httpx.HTTPError as error:  # no answer at all: the request was lost
        outcome.add(type(error).__name__, time.perf_counter() - started)
        return
    outcome.add(str(response.status_code), time.perf_counter() - started, response.headers.get("retry-after"))


async def closed_loop(url: str, data: bytes, *, concurrency: int, seconds: float) -> Outcome:
    """`concurrency` clients back to back for `seconds`."""
    outcome = Outcome()
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency), timeout=60) as client:
        started = time.perf_counter()

        async def client_loop() -> None:
            while time.perf_counter() - started < seconds:
                await post(client, url, data, outcome)

        async with _lag_watch(outcome):
            await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        outcome.wall_s = time.perf_counter() - started
    return outcome


async def open_loop(url: str, data: bytes, *, rate: float, seconds: float, pools: int = 16) -> Outcome:
    """Requests arrive at `rate` per second for `seconds`, whether or not earlier ones were answered.

    They are spread over `pools` clients: an httpx connection pool does work in proportion to the
    requests in flight on each request's start and end, so one pool carrying hundreds of them at once
    spends more CPU the further it falls behind, until the client, not the server, sets the latency."""
    outcome = Outcome()
    async with AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(
                httpx.AsyncClient(limits=httpx.Limits(max_connections=None, max_keepalive_connections=32), timeout=60)
            )
            for _ in range(pools)
        ]
        started = time.perf_counter()
        tasks = []
        async with _lag_watch(outcome):
            for i in range(int(rate * seconds)):
                delay = started + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)  # the arrival schedule, not a wait for the server
                tasks.append(asyncio.create_task(post(clients[i % pools], url, data, outcome)))
            await asyncio.gather(*tasks)
        outcome.wall_s = time.perf_counter() - started
    return outcome


@asynccontextmanager
async def _lag_watch(outcome: Outcome, tick_s: float = 0.005) -> AsyncIterator[None]:
    """Measures the client's event-loop lag while the load runs."""

    async def watch() -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(tick_s)
            outcome.loop_lag_max_s = max(outcome.loop_lag_max_s, time.perf_counter() - before - tick_s)

    task = asyncio.create_task(watch())
    try:
        yield
    finally:
        task.cancel()


def start(mode: str, url: str, image: Path, **options: float) -> subprocess.Popen[str]:
    """Run this generator in a process of its own (from a test), in the background."""
    flags = [part for name, value in options.items() for part in (f"--{name}", str(value))]
    return subprocess.Popen(
        [sys.executable, "-m", "tests.loadgen", mode, url, str(image), *flags],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen[str]) -> Outcome:
    """Wait for a generator started with `start` and read its outcome."""
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    return Outcome(**json.loads(out))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.loadgen", description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("closed", "open"))
    parser.add_argument("url")
    parser.add_argument("image", type=Path)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rate", type=float, default=0.0)
    args = parser.parse_args(argv)
    data = args.image.read_bytes()
    gc.collect()
    gc.freeze()  # what was imported is never scanned again: collections stay short
    if args.mode == "closed":
        outcome = asyncio.run(closed_loop(args.url, data, concurrency=args.concurrency, seconds=args.seconds))
    else:
        outcome = asyncio.run(open_loop(args.url, data, rate=args.rate, seconds=args.seconds))
    json.dump(asdict(outcome), sys.stdout)


if __name__ == "__main__":
    main()
