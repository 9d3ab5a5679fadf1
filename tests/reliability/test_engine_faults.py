"""No outage from a fault of the engine process or a swap, as real processes under real load.

- swaps to what is no checkpoint (devices, endless and huge files, a FIFO, paths out of the models
  folder) are answered 4xx at once, the engine never reads them, the old model answers throughout,
  and a good swap succeeds right after;
- a load past API_MODEL_LOAD_TIMEOUT_S is abandoned: 400 at its deadline, its process killed;
- the engine killed under load: every request is answered 200 (in-flight ones are sent again to the
  next engine, new ones wait for it), while readiness says 503;
- the engine stopped (SIGSTOP): readiness 503 and a new engine within bounds, no answer past its deadline;
- an image in flight at two engine deaths is answered 503, not sent a third time.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import torch

from api.remote import entrypoints
from tests import loadgen
from tests.helpers import CLI, ServerProcess, eventually, served_process, tiny_model
from tests.support import cmdline, cpu_s, engine_pids, process_tree, status_kb

ADMIN = {"X-API-Key": "admin-secret"}
ROOT = Path(__file__).resolve().parents[2]
STALL_S = 8.0  # API_ENGINE_STALL_S's default


@dataclass
class Readiness:
    """/health polled from a thread: when it said what."""

    url: str
    seen: list[tuple[float, int]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> Readiness:
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(timeout=30)

    def _poll(self) -> None:
        with httpx.Client(base_url=self.url, timeout=5) as client:
            while not self.stop.is_set():
                self.seen.append((time.monotonic(), client.get("/health").status_code))
                time.sleep(0.05)

    def after(self, event: float) -> tuple[float | None, float | None]:
        """Seconds from `event` to the first 503, and from `event` to the first 200 after that 503."""
        down = next((at for at, code in self.seen if at >= event and code == 503), None)
        if down is None:
            return None, None
        up = next((at for at, code in self.seen if at > down and code == 200), None)
        return down - event, None if up is None else up - event


def _swap(url: str, checkpoint: str | None, timeout: float = 300) -> httpx.Response:
    body = {"parameters": {"checkpoint": checkpoint}} if checkpoint else {}
    return httpx.post(f"{url}/v2/repository/models/cat-breeds/load", json=body, headers=ADMIN, timeout=timeout)


def _engine(server: ServerProcess) -> int:
    eventually(lambda: len(engine_pids(server.pid)) == 1, timeout_s=60, what="one engine process")
    return engine_pids(server.pid)[0]


@pytest.fixture(scope="module")
def models(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder: the demo model, and traps a swap may be pointed at."""
    folder = tmp_path_factory.mktemp("models")
    shutil.copytree(demo_dir, folder / "demo")
    shutil.copytree(demo_dir, folder / "demo-again")
    with (folder / "huge.pt").open("wb") as huge:
        huge.truncate(20 << 30)  # 20 GiB, sparse: no disk taken, but its size says 20 GiB
    os.mkfifo(folder / "fifo.pt")
    (folder / "zero.pt").symlink_to("/dev/zero")
    return folder


@pytest.fixture(scope="module")
def chelsea_file(chelsea_jpeg: bytes, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("images") / "chelsea.jpg"
    path.write_bytes(chelsea_jpeg)
    return path


@pytest.fixture
def demo_server(models: Path, tmp_path: Path) -> Iterator[ServerProcess]:
    env = {"API_CHECKPOINT_PATH": models / "demo", "API_ADMIN_KEY": ADMIN["X-API-Key"], "API_MODEL_REPOSITORY": models}
    with served_process([CLI, "serve"], tmp_path, **env) as server:
        yield server


BAD_SWAPS = [
    ("/dev/zero", "outside the models folder"),
    ("/dev/urandom", "outside the models folder"),
    ("/etc/passwd", "outside the models folder"),
    ("/proc/self/environ", "outside the models folder"),
    ("../../../../../../etc/passwd", "outside the models folder"),
    ("demo/../../outside.pt", "outside the models folder"),
    ("zero.pt", "outside the models folder"),  # a symlink to /dev/zero
    ("fifo.pt", "is a FIFO"),
    ("huge.pt", "not enough host memory"),  # checked from its size, before a byte is read
    ("no-such.pt", "no checkpoint at"),
]


def test_bad_swaps_are_refused_and_the_old_model_answers_throughout(
    demo_server: ServerProcess, models: Path, chelsea_file: Path
) -> None:
    engine = _engine(demo_server)
    version = httpx.get(demo_server.url + "/api/v1/model").json()["version"]
    peak: list[int] = []
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            peak.append(status_kb("VmRSS", engine))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    before_kb = status_kb("VmRSS", engine)
    load = loadgen.start("closed", demo_server.url, chelsea_file, concurrency=4, seconds=8)
    sampler.start()
    answers = {}
    try:
        for requested, why in BAD_SWAPS:
            started = time.monotonic()
            answer = _swap(demo_server.url, requested, timeout=60)
            answers[requested] = (answer, time.monotonic() - started, why)
    finally:
        outcome = loadgen.finish(load)
        sampling.set()
        sampler.join()
    for requested, (answer, seconds, why) in answers.items():
        assert answer.status_code == 400, (requested, answer.text)
        assert why in answer.json()["error"], (requested, answer.text)
        assert seconds < 5, f"{requested}: answered after {seconds:.1f}s"
    assert str(models) in answers["/dev/zero"][0].json()["error"]  # it names the folder
    print(
        f"\nbad swaps: {len(answers)} answered 400 in at most {max(s for _, s, _ in answers.values()) * 1000:.0f} ms; "
        f"engine RSS {before_kb / 1024:.0f} MiB before, at most {max(peak) / 1024:.0f} MiB meanwhile; "
        f"load: {outcome.statuses}"
    )
    assert outcome.statuses.keys() == {"200"}, outcome.statuses  # the old model answered throughout
    assert max(peak) < before_kb + 200 * 1024  # the engine read none of them (it holds 8+ GB after /dev/zero)
    assert httpx.get(demo_server.url + "/api/v1/model").json()["version"] == version

    good = _swap(demo_server.url, "demo-again")  # right after a refusal: never 409
    assert good.status_code == 200, good.text
    assert good.json()["checkpoint"] == str(models / "demo-again")
    assert engine_pids(demo_server.pid) == [engine]  # nothing a swap was given stopped the engine


def test_a_load_past_its_deadline_is_abandoned(tiny_checkpoint: Path, tmp_path: Path, chelsea_jpeg: bytes) -> None:
    """A real-size model cannot be built within 1 s (its process alone imports torch): the swap is
    answered 400 at its deadline, the process building it is killed, the served model answers, and
    the next swap is taken at once (not 409)."""
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(tiny_checkpoint, folder / "best_model.pt")
    shutil.copy(tiny_checkpoint.parent / "classes.txt", folder / "classes.txt")
    torch.save({"architecture": "resnet50", "state_dict": tiny_model("resnet50").state_dict()}, folder / "big.pt")
    env = {
        "API_CHECKPOINT_PATH": folder / "best_model.pt",
        "API_MODEL_NAME": "test_resnet",
        "API_RUNTIME": "torch",
        "API_PRECISION": "fp32",  # one candidate: nothing measured, the first load fits the deadline too
        "API_ADMIN_KEY": ADMIN["X-API-Key"],
        "API_MODEL_LOAD_TIMEOUT_S": 1,
    }
    with served_process([CLI, "serve"], tmp_path, **env) as server:
        started = time.monotonic()
        answer = _swap(server.url, "big.pt")
        seconds = time.monotonic() - started
        assert answer.status_code == 400 and "did not load within 1s" in answer.json()["error"], answer.text
        assert seconds < 5, f"answered after {seconds:.1f}s"
        eventually(
            lambda: not any(entrypoints.PREPARE in cmdline(p) for p in process_tree(server.pid)),
            what="the process building it killed",
        )
        again = _swap(server.url, "no-such.pt")
        assert again.status_code == 400 and "no checkpoint at" in again.json()["error"], again.text
        predicted = httpx.post(server.url + "/api/v1/predict", files={"file": ("c.jpg", chelsea_jpeg)})
        assert predicted.status_code == 200
        print(f"\nabandoned load: answered 400 after {seconds:.2f}s (API_MODEL_LOAD_TIMEOUT_S=1)")


def test_a_killed_engine_loses_no_request(demo_server: ServerProcess, chelsea_file: Path) -> None:
    engine = _engine(demo_server)
    with Readiness(demo_server.url) as readiness:
        load = loadgen.start("closed", demo_server.url, chelsea_file, concurrency=4, seconds=15)
        eventually(lambda: readiness.seen and readiness.seen[-1][1] == 200, what="serving")
        time.sleep(2)  # load running: requests in flight when the engine dies
        os.kill(engine, signal.SIGKILL)
        killed = time.monotonic()
        outcome = loadgen.finish(load)
    not_ready, ready = readiness.after(killed)
    print(
        f"\nengine killed under 4 clients: {outcome.statuses}, worst {max(outcome.latencies_200):.2f}s; "
        f"readiness 503 after {not_ready}s, 200 again after {ready}s"
    )
    assert outcome.statuses.keys() == {"200"}, outcome.statuses
    assert not_ready is not None and not_ready < 2  # readiness steered load balancers away
    assert ready is not None and ready < 30
    assert engine_pids(demo_server.pid) not in ([], [engine])


def test_a_stopped_engine_is_replaced(demo_server: ServerProcess, chelsea_file: Path) -> None:
    engine = _engine(demo_server)
    with Readiness(demo_server.url) as readiness:
        load = loadgen.start("closed", demo_server.url, chelsea_file, concurrency=4, seconds=32)
        eventually(lambda: readiness.seen and readiness.seen[-1][1] == 200, what="serving")
        time.sleep(2)
        os.kill(engine, signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            eventually(lambda: engine_pids(demo_server.pid) not in ([], [engine]), timeout_s=30, what="a new engine")
            replaced = time.monotonic() - stopped
            outcome = loadgen.finish(load)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(engine, signal.SIGCONT)
    not_ready, ready = readiness.after(stopped)
    worst = max(outcome.latencies_200)
    print(
        f"\nengine stopped under 4 clients: readiness 503 after {not_ready}s, a new engine after {replaced:.1f}s, "
        f"200 again after {ready}s; {outcome.statuses}, worst {worst:.2f}s"
    )
    assert not_ready is not None and not_ready < 10
    assert ready is not None and ready < 25
    assert outcome.statuses.keys() == {"200"}, outcome.statuses  # waiting requests were sent again
    assert worst < 30  # none waited its full deadline
    assert "finished no batch" in demo_server.log() or "said nothing" in demo_server.log()


def test_an_image_in_flight_at_two_engine_deaths_is_answered_503(tmp_path: Path, chelsea_jpeg: bytes) -> None:
    """An image that may be what kills the engine is sent again once, not twice. Its forward pass
    is slow (resnet50 at 1024 px on one thread), so each engine dies with it in flight."""
    checkpoint = tmp_path / "resnet50.pt"
    torch.save({"architecture": "resnet50", "state_dict": tiny_model("resnet50").state_dict()}, checkpoint)
    env = {
        "API_CHECKPOINT_PATH": checkpoint,
        "API_NUM_CLASSES": 5,
        "API_IMAGE_SIZE": 1024,
        "API_RUNTIME": "torch",
        "API_PRECISION": "fp32",
        "API_NUM_THREADS": 1,
        "API_MAX_BATCH_SIZE": 1,
    }
    with served_process([CLI, "serve"], tmp_path, **env) as server:
        answer: dict[str, httpx.Response] = {}
        posting = threading.Thread(
            target=lambda: answer.update(
                r=httpx.post(server.url + "/api/v1/predict", files={"file": ("c.jpg", chelsea_jpeg)}, timeout=120)
            )
        )
        first = _engine(server)
        busy_from = cpu_s(first)
        posting.start()
        eventually(lambda: cpu_s(first) > busy_from + 0.3, timeout_s=30, what="the first engine computing it")
        os.kill(first, signal.SIGKILL)
        eventually(lambda: "sending 1 images again" in server.log(), timeout_s=120, what="sent again")
        (second,) = [p for p in engine_pids(server.pid) if p != first]
        os.kill(second, signal.SIGKILL)  # its forward pass takes seconds: the image is still in flight
        posting.join(timeout=120)
        refused = answer["r"]
        assert refused.status_code == 503, refused.text
        assert "ended twice with this image in flight" in refused.json()["error"]["message"]
        assert refused.headers.get("retry-after")
        eventually(lambda: httpx.get(server.url + "/health").status_code == 200, timeout_s=120, what="a third engine")


def test_an_engine_that_stalls_while_loading_after_a_restart_is_replaced(
    tiny_checkpoint: Path, tmp_path: Path, chelsea_jpeg: bytes
) -> None:
    """The engine started after a death is stopped before it says hello (it never sends one): the
    front-end kills it after API_MODEL_LOAD_TIMEOUT_S and starts another, which serves."""
    env = {
        "API_CHECKPOINT_PATH": tiny_checkpoint,
        "API_MODEL_NAME": "test_resnet",
        "API_RUNTIME": "torch",
        "API_MODEL_LOAD_TIMEOUT_S": 20,
    }
    with served_process([CLI, "serve"], tmp_path, **env) as server:
        first = _engine(server)
        os.kill(first, signal.SIGKILL)
        eventually(lambda: [p for p in engine_pids(server.pid) if p != first] != [], timeout_s=30, what="a second")
        (second,) = [p for p in engine_pids(server.pid) if p != first]
        os.kill(second, signal.SIGSTOP)  # it is still importing torch: long before its hello
        try:
            eventually(
                lambda: any(p not in (first, second) for p in engine_pids(server.pid)), timeout_s=60, what="a third"
            )
            eventually(lambda: httpx.get(server.url + "/health").status_code == 200, timeout_s=60, what="ready")
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(second, signal.SIGCONT)
        assert (
            "within 20s (API_MODEL_LOAD_TIMEOUT_S): killed it" in server.log()
            or "did not start within 20s" in server.log()
        )
        predicted = httpx.post(server.url + "/api/v1/predict", files={"file": ("c.jpg", chelsea_jpeg)})
        assert predicted.status_code == 200
