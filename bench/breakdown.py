"""Where a front-end's CPU goes, request by request, split by step (`make bench-frontend` prints it).

The front-end's CPU per image is read from /proc for its event loop's thread and for its decode
threads separately (`bench.frontend`); this splits each:

- the event loop: py-spy (a sampling profiler: no change to the code it watches) records the loaded
  front-end with `--gil`, sampling only the thread that holds the GIL: the event loop runs Python
  with it held, so its samples fall where its CPU goes (without `--gil`, py-spy counts a thread
  waiting for a CPU or in a syscall as busy, and on a saturated machine that inflates whatever
  yields). Each sample is charged to the step of its innermost frame, walking outwards past
  helpers anyone calls (asyncio, json, logging, numpy, contextlib...) to the frame that called them.
- the decode threads: Pillow releases the GIL while it decodes and resizes, so the steps are timed
  instead, on the same photo, with the thread's own CPU clock; what the threads spend beyond the
  steps (handing jobs to and from the pool, waiting for the GIL) is the remainder.

    python -m bench.breakdown samples.txt          (a `py-spy record --format raw --threads --gil` file)
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from api.config import BatchingSettings
from api.engine.images import fast_resize
from api.engine.images.decode import decode_image
from api.engine.images.recipe import Recipe
from api.engine.serving.pipeline import decode_budget
from api.remote.frontend.link import INLINE_WORK, open_small_jpeg

# (step, files whose frames belong to it), first match wins; a frame in none is a helper (see above)
INLINE_DECODE = (
    "opening, pricing, decoding on the event loop"  # a small JPEG's (api/remote/frontend/link.py): timed, not sampled
)
LOOP_STEPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (INLINE_DECODE, ("api/engine/images/", "PIL/", "simplejpeg", "api/engine/serving/pipeline.py:prepare_upload")),
    ("multipart parsing", ("python_multipart/", "api/http/multipart.py", "api/http/uploads.py",
                           "starlette/requests.py:Request.stream")),
    ("access log", ("api/http/requestlog.py", "api/logs.py", "logging/")),
    ("metrics", ("api/http/metrics.py", "prometheus_client/")),
    ("body limit", ("api/http/body_limit.py",)),
    ("admission and engine link", ("api/remote/", "api/engine/serving/", "msgspec")),
    ("answer: schema and JSON", ("api/http/schemas.py", "pydantic", "fastapi/encoders.py", "starlette/responses.py",
                                 "api/engine/model/served.py", "api/http/routes/")),
    ("routing, dependencies, middleware", ("fastapi/", "starlette/", "api/http/", "uvicorn/middleware/")),
    ("HTTP protocol (uvicorn, httptools)", ("uvicorn/protocols/", "httptools", "h11/")),
    ("request id", ("uuid.py",)),
    ("event loop (uvloop, asyncio)", ("asyncio/runners.py", "uvloop", "asyncio/base_events.py", "asyncio/events.py",
                                      "selectors.py")),
)  # fmt: skip
HELPERS = (
    "asyncio/", "json/", "logging/", "numpy/", "contextlib.py", "functools.py", "typing.py", "enum.py", "re/",
    "weakref", "_weakrefset.py", "abc.py", "<string>", "copy.py", "collections/", "dataclasses.py",
)  # fmt: skip

_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^:()]*)(?::\d+)?\)$")


@dataclass(frozen=True)
class Frame:
    function: str
    file: str

    def matches(self, pattern: str) -> bool:
        """`pattern` is a file's path part, or "path:function" for one function of it."""
        path, _, function = pattern.partition(":")
        return path in self.file and (not function or self.function == function)


def parse(line: str) -> tuple[str, list[Frame], int] | None:
    """One line of py-spy's raw output: (thread name, frames outermost first, samples)."""
    stack, _, count = line.rstrip().rpartition(" ")
    if not stack or not count.isdigit():
        return None
    parts = stack.split(";")
    thread = parts[0].partition(": ")[2] if parts[0].startswith("thread") else ""
    frames = []
    for part in parts[1:] if thread else parts:
        match = _FRAME.match(part)
        frames.append(Frame(match["function"], match["file"]) if match else Frame(part, ""))
    return thread or (frames[0].function if frames else ""), frames, int(count)


def step_of(frames: list[Frame], steps: tuple[tuple[str, tuple[str, ...]], ...]) -> str:
    """The step of the innermost frame that is not a helper (or the innermost helper's, if all are)."""
    for frame in reversed(frames):
        for step, patterns in steps:
            if any(frame.matches(pattern) for pattern in patterns):
                if any(frame.matches(helper) for helper in HELPERS) and step != steps[-1][0]:
                    break  # a helper that happens to match, e.g. logging/ for the access log: keep walking
                return step
        else:
            if any(frame.matches(helper) for helper in HELPERS):
                continue
            return "other"
    return "other"


def loop_shares(lines: list[str]) -> dict[str, float]:
    """{step: share of the event loop's samples}."""
    counts: Counter[str] = Counter()
    for line in lines:
        parsed = parse(line)
        if parsed is not None and parsed[0] == "MainThread":
            counts[step_of(parsed[1], LOOP_STEPS)] += parsed[2]
    total = sum(counts.values()) or 1
    return {step: count / total for step, count in counts.items()}


def record(pid: int, seconds: float, out: Path) -> list[str]:
    """py-spy's samples of process `pid` (its threads, the GIL holder only) for `seconds`."""
    py_spy = Path(sys.executable).with_name("py-spy")
    command = [str(py_spy), "record", "-p", str(pid), "-d", str(max(1, round(seconds))), "-r", "250"]
    command += ["--format", "raw", "--threads", "--gil", "--nonblocking", "-o", str(out)]
    subprocess.run(command, check=True, capture_output=True)
    return out.read_text().splitlines()


def decode_steps(
    data: bytes, recipe: Recipe, options: BatchingSettings, *, ship: bool, repeat: int = 200
) -> dict[str, float]:
    """CPU milliseconds of each step a decode thread runs for one upload, on this thread's own clock:
    the decode (header, pricing, pixels), the resize + crop unless the engine resizes (`ship`), the
    copy into the ring slot."""
    budget = decode_budget(options)
    reduce_to = recipe.resize_short_side if options.reduced_decode else None
    decoded = decode_image(data, max_pixels=options.max_image_pixels, reduce_to=reduce_to, budget=budget)
    pixels = decoded.pixels if ship else fast_resize.pixels(decoded.image, recipe, options.resize)
    slot = np.empty_like(pixels)
    steps: dict[str, Callable[[], object]] = {
        "decode (header, pricing, pixels)": lambda: (
            decode_image(data, max_pixels=options.max_image_pixels, reduce_to=reduce_to, budget=budget).pixels
        ),
    }
    if not ship:
        steps[f"resize + crop ({options.resize})"] = lambda: fast_resize.pixels(decoded.image, recipe, options.resize)
    steps["copy into the ring slot"] = lambda: np.copyto(slot, pixels)
    costs = {}
    for step, run in steps.items():
        run()
        best = float("inf")
        for _ in range(3):
            started = time.thread_time()
            for _ in range(repeat):
                run()
            best = min(best, (time.thread_time() - started) / repeat * 1000)
        costs[step] = best
    return costs


def decoded_inline(data: bytes, recipe: Recipe, options: BatchingSettings) -> bool:
    """Whether a front-end decodes `data` on its event loop (api/remote/frontend/link.py's rule)."""
    reduce_to = recipe.resize_short_side if options.reduced_decode else None
    opened = open_small_jpeg(data, reduce_to=reduce_to, options=options)
    if opened is None:
        return False
    opened.image.close()
    return opened.cost.work <= INLINE_WORK


def table(loop_ms: float, shares: dict[str, float], pool_ms: float, steps: dict[str, float], *, inline: bool) -> str:
    """Markdown rows: each step's CPU milliseconds per image and its share of the front-end's. With
    `inline`, the timed decode steps ran on the event loop: they come out of its CPU before the rest
    is split by the samples (the decode releases the GIL, so the samples do not see it)."""
    total = loop_ms + pool_ms
    timed = sum(steps.values()) if inline else 0.0
    sampled = {step: share for step, share in shares.items() if not (inline and step == INLINE_DECODE)}
    scale = (loop_ms - timed) / (sum(sampled.values()) or 1.0)
    rows = ["| thread | step | CPU ms/img | share |", "| --- | --- | --- | --- |"]
    for step, share in sorted(sampled.items(), key=lambda item: -item[1]):
        rows.append(f"| event loop | {step} | {share * scale:.3f} | {share * scale / total:.1%} |")
    where = "event loop" if inline else "decode threads"
    for step, ms in steps.items():
        rows.append(f"| {where} | {step} (timed) | {ms:.3f} | {ms / total:.1%} |")
    rest = pool_ms if inline else pool_ms - sum(steps.values())
    remainder = "hand-off to and from the pool, GIL waits (the remainder)"
    rows.append(f"| decode threads | {remainder} | {rest:.3f} | {rest / total:.1%} |")
    rows.append(f"| all | | {total:.3f} | 100% |")
    return "\n".join(rows)


if __name__ == "__main__":
    for step, share in sorted(loop_shares(Path(sys.argv[1]).read_text().splitlines()).items(), key=lambda i: -i[1]):
        print(f"{share:6.1%}  {step}")
