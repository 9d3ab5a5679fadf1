"""Support shared by the tests and the bench: ports, processes, procfs memory, metrics scrapes, polling.

One copy of each: a server process as a context manager, memory read from /proc, a Prometheus
scrape as a dict, readiness polls instead of sleeps.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from api.config import Settings
from api.engine.images.budget import DecodeBudget
from api.engine.model.served import Served
from api.remote import entrypoints

# a model as the answers name it, for tests of what carries it (messages, swap rules)
SERVED = Served(
    "resnet50",
    ("abyssinian", "bengal", "birman"),
    "cpu",
    "a" * 64,
    multi_label=False,
    threshold=0.5,
    runtime="torch",
    precision="fp32",
    folds=1,
)

# what one upload may cost by default (API_DECODE_BUDGET_MP's default)
DECODE_BUDGET = DecodeBudget(Settings.model_fields["decode_budget_mp"].default)

# --- ports and polling -----------------------------------------------------------------------------


def free_port() -> int:
    """A port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def eventually(
    check: Callable[[], bool], *, timeout_s: float = 10.0, what: str = "condition", interval_s: float = 0.02
) -> None:
    """Poll `check` until it holds (work a server thread finishes after its response, e.g. a log line;
    a container's state: pass a longer `interval_s` where each check starts a process)."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not hold within {timeout_s}s")
        time.sleep(interval_s)


def wait_for(
    url: str, path: str = "/health", *, timeout_s: float = 60.0, accept: Callable[[int], bool] | None = None
) -> None:
    """Poll until `path` answers 200 (readiness poll, not a sleep)."""
    accept = accept or (lambda status: status == 200)
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            response = httpx.get(url + path, timeout=2.0)
            if accept(response.status_code):
                return
            last = f"{response.status_code} {response.text[:200]}"
        except httpx.TransportError as error:
            last = repr(error)
        time.sleep(0.05)
    raise TimeoutError(f"{url}{path} not ready: {last}")


# --- procfs ------------------------------------------------------------------------------------------


def status_kb(field: str, pid: int | str = "self") -> int:
    """One /proc/<pid>/status field in kB (VmRSS, VmHWM, ...)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith(f"{field}:"))


def cpu_s(pid: int, thread: int | None = None) -> float:
    """A process's CPU seconds (utime + stime), or one of its threads' (`thread`: its tid)."""
    stat = f"/proc/{pid}/task/{thread}/stat" if thread is not None else f"/proc/{pid}/stat"
    fields = Path(stat).read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int | str = "self") -> float:
    return status_kb("VmRSS", pid) / 1024


def cmdline(pid: int) -> str:
    """A process's command line, spaces between the arguments ("" once it has gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def engine_pids(pid: int) -> list[int]:
    """The engine processes (`python -m api.remote.host.main`) among `pid`'s descendants."""
    return [p for p in process_tree(pid)[1:] if entrypoints.ENGINE in cmdline(p)]


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (a Gunicorn master and its workers; an engine process, which a front-end
    starts from one of its threads: each thread lists the children it started)."""
    kids = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            kids += [int(k) for k in children.read_text().split()]
        except OSError:
            continue
    return [pid] + [p for kid in sorted(kids) for p in process_tree(kid)]


def tree_mb(pid: int, field: str = "VmRSS") -> float:
    """A /proc status field summed over the process tree, in MiB (processes that ended count 0)."""
    total = 0
    for member in process_tree(pid):
        try:
            total += status_kb(field, member)
        except (OSError, StopIteration):
            continue
    return total / 1024


def tree_pss_mb(pid: int) -> float:
    """Proportional set size of the process tree (shared pages split between the sharers), in MiB."""
    total = 0
    for member in process_tree(pid):
        try:
            rollup = Path(f"/proc/{member}/smaps_rollup").read_text()
        except OSError:
            continue
        total += next(int(line.split()[1]) for line in rollup.splitlines() if line.startswith("Pss:"))
    return total / 1024


# --- metrics -------------------------------------------------------------------------------------------


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {"name{label=value,...}": value}, summed over workers (the `pid` label)."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k != "pid")
            key = f"{sample.name}{{{labels}}}" if labels else sample.name
            found[key] = found.get(key, 0.0) + sample.value
    return found


def scrape(url: str, **options: object) -> dict[str, float]:
    """GET <url>/metrics, parsed (see `parse_metrics`)."""
    return parse_metrics(httpx.get(url + "/metrics", timeout=10, **options).text)  # type: ignore[arg-type]


# --- server processes ------------------------------------------------------------------------------------


BIN = Path(sys.executable).parent
CLI = str(BIN / "cat-breeds-api")


def process_env(**values: object) -> dict[str, str]:
    """This environment without the developer's API_* / LOG_LEVEL, plus `values`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("API_") and k != "LOG_LEVEL"}
    env.update({k: str(v) for k, v in values.items()})
    return env


def start_process(command: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
    """Start a server whose output goes to cwd/server.log (a pipe nobody reads would fill and stall it)."""
    with (cwd / "server.log").open("w") as log:
        return subprocess.Popen(command, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, text=True)


class ServerProcess:
    """A service started as users start it (`cat-breeds-api serve`, gunicorn), as a separate process."""

    def __init__(self, command: list[str], cwd: Path, **env: object):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cwd = cwd
        command = [part.replace("{port}", str(self.port)) for part in command]  # for uvicorn's --port
        self.process = start_process(command, process_env(API_PORT=self.port, **env), cwd)

    @property
    def pid(self) -> int:
        return self.process.pid

    def children(self) -> list[int]:
        return process_tree(self.pid)[1:]

    def rss_mb(self) -> float:
        """Resident memory of the server and its children (workers), in MiB."""
        return tree_mb(self.pid)

    def pss_mb(self) -> float:
        return tree_pss_mb(self.pid)

    def metrics(self) -> dict[str, float]:
        return scrape(self.url)

    def log(self) -> str:
        return (self.cwd / "server.log").read_text()

    def records(self) -> list[dict]:
        """The JSON log lines (the default log format)."""
        return [json.loads(line) for line in self.log().splitlines() if line.startswith("{")]

    def wait_ready(self, timeout_s: float = 120) -> None:
        """Poll /health until 200; fail at once, with the log, if the server exits instead."""
        deadline = time.monotonic() + timeout_s
        while self.process.poll() is None:
            try:
                if httpx.get(self.url + "/health", timeout=2.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.url} not ready after {timeout_s}s:\n{self.log()[-3000:]}")
            time.sleep(0.05)
        raise AssertionError(f"server exited with {self.process.returncode}:\n{self.log()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)
            raise


@contextmanager
def served_process(command: list[str], cwd: Path, *, ready: bool = True, **env: object) -> Iterator[ServerProcess]:
    server = ServerProcess(command, cwd, **env)
    try:
        if ready:
            server.wait_ready()
        yield server
    finally:
        tree = process_tree(server.pid)  # uvicorn's workers and the engine outlive a killed parent
        for pid in reversed(tree):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        server.process.wait(timeout=30)
