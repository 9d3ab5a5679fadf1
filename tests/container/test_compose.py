"""The seed's validation steps, automated against the real image and Compose stack."""

from __future__ import annotations

import concurrent.futures
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.container.conftest import ROOT, Stack, free_port
from tests.helpers import IMAGENET_CATS, jpeg_bytes
from tests.support import eventually, parse_metrics

ARTIFACTS = ROOT / "artifacts"


def _report(key: str, value: object) -> None:
    """Measured figures land in artifacts/container-report.json (and the test output)."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / "container-report.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[key] = value
    path.write_text(json.dumps(data, indent=2))
    print(f"{key}: {value}")


@pytest.fixture(scope="module")
def stack(make_stack: Callable[..., Stack], images: dict[str, float]) -> Stack:
    """The base + CPU stack with a real checkpoint, up and healthy (check 1)."""
    stack = make_stack("base")
    up_s = stack.up()
    healthy_s = stack.wait_healthy()
    _report("build_seconds", round(images["build_s"], 1))
    _report("up_seconds", round(up_s, 1))
    _report("seconds_to_healthy", round(up_s + healthy_s, 1))
    size = subprocess.run(
        ["docker", "image", "inspect", "--format", "{{.Size}}", f"cat-breeds-api:{stack.env['IMAGE_TAG']}"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    _report("image_gb", round(int(size) / 1e9, 2))
    return stack


def test_1_up_is_healthy_and_health_answers_on_the_host(stack: Stack) -> None:
    response = stack.get("/health")
    assert response.status_code == 200 and response.json()["status"] == "ready"
    assert stack.inspect()["State"]["Health"]["Status"] == "healthy"


def test_2_predict_from_the_host(stack: Stack, chelsea_jpeg: bytes) -> None:
    response = httpx.post(stack.url + "/api/v1/predict", files={"file": ("chelsea.jpg", chelsea_jpeg)}, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["predictions"][0]["index"] in IMAGENET_CATS
    assert body["model"]["architecture"] == "tf_efficientnet_lite0"
    assert stack.get("/api/v1/model").json()["device"] == "cpu"


def test_3_logs_volume_survives_restart_and_holds_the_service_log(stack: Stack) -> None:
    stack.exec("sh", "-c", "echo kept > /app/logs/marker.txt")
    stack.compose("restart", "--timeout", "30")
    stack.wait_healthy()
    assert stack.exec("cat", "/app/logs/marker.txt").stdout.strip() == "kept"
    log = stack.exec("cat", "/app/logs/api.log").stdout
    assert "model ready: tf_efficientnet_lite0" in log


def test_4_killed_server_is_restarted_healthy(stack: Stack) -> None:
    before = stack.inspect()["RestartCount"]
    # PID 1 is tini (init: true); kill the server under it, as a crash would.
    stack.exec(
        "python3", "-c",
        "import os, signal\n"
        "for pid in filter(str.isdigit, os.listdir('/proc')):\n"
        "    if pid != '1' and b'api.cli' in open(f'/proc/{pid}/cmdline', 'rb').read():\n"
        "        os.kill(int(pid), signal.SIGKILL)",
        check=False,
    )  # fmt: skip
    eventually(
        lambda: stack.inspect()["RestartCount"] != before,
        timeout_s=120,
        interval_s=0.5,
        what="a restart (restart: unless-stopped should bring it back)",
    )
    assert stack.inspect()["RestartCount"] == before + 1
    stack.wait_healthy()
    assert stack.get("/health").status_code == 200


def test_5_limits_loopback_port_non_root_and_read_only_models(stack: Stack) -> None:
    info = stack.inspect()
    host = info["HostConfig"]
    assert host["NanoCpus"] == int(float(stack.env["CPU_LIMIT"]) * 1e9)
    assert host["Memory"] == 8 * 1024**3  # MEMORY_LIMIT default 8G
    assert host["RestartPolicy"]["Name"] == "unless-stopped"
    assert host["Init"] is True
    bindings = host["PortBindings"]["8000/tcp"]
    assert [b["HostIp"] for b in bindings] == ["127.0.0.1"]
    assert stack.exec("id", "-u").stdout.strip() == "1000"
    mounts = {m["Destination"]: m for m in info["Mounts"]}
    assert mounts["/app/models"]["RW"] is False
    write = stack.exec("touch", "/app/models/should-fail", check=False)
    assert write.returncode != 0 and "Read-only file system" in (write.stdout + write.stderr)
    assert mounts["/app/logs"]["RW"] is True and mounts["/home/appuser/.cache"]["RW"] is True
    stack.exec("touch", "/home/appuser/.cache/writable")  # the cache volume is the app user's
    # hardening: read-only root (only volumes and /tmp take writes), no capabilities, no escalation
    assert host["ReadonlyRootfs"] is True
    assert host["CapDrop"] == ["ALL"] or host["CapDrop"] == ["CAP_ALL"]
    assert "no-new-privileges:true" in host["SecurityOpt"]
    assert host["PidsLimit"] == 512
    root_write = stack.exec("touch", "/should-fail", check=False)
    assert root_write.returncode != 0 and "Read-only file system" in (root_write.stdout + root_write.stderr)
    stack.exec("touch", "/tmp/writable")


def test_6_stop_drains_requests_in_flight(stack: Stack, chelsea: Image.Image) -> None:
    big = jpeg_bytes(chelsea.resize((2400, 1600)))
    files = [("file", (f"{i}.jpg", big)) for i in range(12)]

    def call() -> int:
        return httpx.post(stack.url + "/api/v1/predict/batch", files=files, timeout=120).status_code

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(call) for _ in range(4)]
        eventually(  # stop only once requests are really in flight (the /metrics request itself counts as one)
            lambda: parse_metrics(stack.get("/metrics").text)["cat_breeds_api_http_requests_in_flight"] >= 3,
            timeout_s=30,
            interval_s=0.05,
            what="requests in flight",
        )
        stopped = time.monotonic()
        stack.compose("stop")
        statuses = [f.result() for f in futures]
    assert statuses == [200] * 4
    assert time.monotonic() - stopped < 30
    state = stack.inspect()["State"]
    assert state["Status"] == "exited" and state["ExitCode"] in (0, 143)


def test_7_dev_override_reloads_on_source_change(make_stack: Callable[..., Stack]) -> None:
    project = Path(tempfile.mkdtemp(prefix="cbt-dev-"))
    project.chmod(0o755)
    shutil.copytree(ROOT / "api", project / "api", ignore=shutil.ignore_patterns("__pycache__"))
    for path in [project / "api", *(project / "api").rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    dev = make_stack("dev", ["docker-compose.yml", "docker-compose.cpu.yml", "docker-compose.override.yml"])
    dev.project_dir = project  # ./api in the override resolves here: we edit this copy, not the repo
    dev.env["DEBUGPY_PORT"] = str(free_port())
    try:
        dev.up()
        dev.wait_healthy()
        assert dev.get("/openapi.json").json()["info"]["version"] != "9.9.9-dev"
        assert dev.exec("sh", "-c", "echo $LOG_LEVEL").stdout.strip() == "DEBUG"
        init = project / "api" / "__init__.py"
        init.write_text(init.read_text().replace('__version__ = "', '__version__ = "9.9.9-dev" or "'))

        def reloaded() -> bool:
            try:
                version = dev.get("/openapi.json").json()["info"]["version"]
                return bool(version == "9.9.9-dev" and dev.get("/health").status_code == 200)
            except httpx.HTTPError:
                return False  # the server is restarting

        eventually(reloaded, timeout_s=120, interval_s=0.5, what="a reload after editing ./api on the host")
    finally:
        dev.down()
        shutil.rmtree(project, ignore_errors=True)


def test_8_prod_gunicorn_workers_serve(make_stack: Callable[..., Stack], chelsea_jpeg: bytes) -> None:
    files = ["docker-compose.yml", "docker-compose.cpu.yml", "docker-compose.prod.yml"]
    prod = make_stack("prod", files, WEB_CONCURRENCY="2", API_ADMIN_KEY="container-admin-key")
    prod.env["API_PORT_RANGE"] = prod.env["API_PORT"]
    try:
        prod.up()
        prod.wait_healthy()
        for _ in range(4):
            response = httpx.post(prod.url + "/api/v1/predict", files={"file": chelsea_jpeg}, timeout=60)
            assert response.status_code == 200
            assert response.json()["predictions"][0]["index"] in IMAGENET_CATS
        processes = prod.exec(
            "python3", "-c",
            "import os\nargv = [open(f'/proc/{p}/cmdline','rb').read().split(b'\\0') for p in os.listdir('/proc') if p.isdigit()]\n"
            "print(sum(any(a.endswith(b'/gunicorn') for a in v[:2]) for v in argv))",
        ).stdout  # fmt: skip
        assert int(processes) == 3  # the master and WEB_CONCURRENCY=2 workers
        engines = prod.exec(
            "python3", "-c",
            "import os\nprint(sum(b'api.remote.host.main' in open(f'/proc/{p}/cmdline','rb').read() for p in os.listdir('/proc') if p.isdigit() and int(p) != os.getpid()))",
        ).stdout  # fmt: skip
        assert int(engines) == 1  # one engine process holds the model for both workers
        # docs/deployment.md's swap command, in the container: the key from the environment Compose passed in
        swapped = prod.exec("python3", "-m", "api.cli", "reload").stdout
        assert "every front-end switched" in swapped, swapped
        assert httpx.get(prod.url + "/v2/health/ready", timeout=10).json() == {"ready": True}
        logging = prod.inspect()["HostConfig"]["LogConfig"]
        assert logging["Type"] == "json-file" and logging["Config"]["max-size"] == "10m"
        assert not prod.inspect()["Name"].endswith("/cat-breeds-api")  # no fixed name: replicas can coexist
    finally:
        prod.down()


def test_9_config_renders_gpu_reservation_and_hadolint_passes(make_stack: Callable[..., Stack]) -> None:
    gpu = make_stack("gpu", ["docker-compose.yml"])
    rendered = json.loads(gpu.compose("config", "--format", "json").stdout)
    service = rendered["services"]["cat-breeds-api"]
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "device_ids": ["0"], "capabilities": ["gpu"]}]
    assert service["ports"][0]["host_ip"] == "127.0.0.1"
    assert "version" not in rendered
    prod = make_stack("prodcfg", ["docker-compose.yml", "docker-compose.prod.yml"])
    assert (
        "gunicorn"
        in json.loads(prod.compose("config", "--format", "json").stdout)["services"]["cat-breeds-api"]["command"]
    )
    cpu = json.loads(make_stack("cpucfg").compose("config", "--format", "json").stdout)
    assert "devices" not in cpu["services"]["cat-breeds-api"]["deploy"]["resources"].get("reservations", {})
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    lint = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_10_missing_checkpoint_never_reports_healthy(make_stack: Callable[..., Stack]) -> None:
    broken = make_stack("missing", API_CHECKPOINT_PATH="/app/models/best_model.pt")
    try:
        broken.up()

        def failed_and_retried() -> bool:
            logs = broken.compose("logs", "--no-color", check=False).stdout
            return "model load failed" in logs and broken.inspect()["RestartCount"] >= 1

        eventually(failed_and_retried, timeout_s=120, interval_s=0.5, what="a failed load, then a retry")
        logs = broken.compose("logs", "--no-color", check=False).stdout
        assert "model load failed: checkpoint not found: /app/models/best_model.pt" in logs
        assert "/app/models" in logs
        state = broken.inspect()["State"]
        assert state.get("Health", {}).get("Status") != "healthy"
        assert state["Status"] in ("restarting", "running", "exited")
        assert broken.inspect()["RestartCount"] >= 1  # it exited (status 3) and the policy retried
    finally:
        broken.down()


_FILE_SETS = {
    "base": ["docker-compose.yml", "docker-compose.cpu.yml"],
    "prod": ["docker-compose.yml", "docker-compose.cpu.yml", "docker-compose.prod.yml"],
    "dev": ["docker-compose.yml", "docker-compose.cpu.yml", "docker-compose.override.yml"],
}


@pytest.mark.parametrize("file_set", list(_FILE_SETS))
def test_11_each_file_set_serves_what_the_checkpoint_records(
    make_stack: Callable[..., Stack], workdir: Path, file_set: str
) -> None:
    """A checkpoint recording test_resnet / 5 classes / 128 px, and no model setting anywhere."""
    from tests.deploy.test_model_defaults import RECORDED, write_recorded_checkpoint

    models = workdir / "recorded"
    if not models.exists():
        write_recorded_checkpoint(models)
        for path in [models, *models.iterdir()]:
            path.chmod(0o755 if path.is_dir() else 0o644)
    stack = make_stack(f"recorded{file_set}", _FILE_SETS[file_set], MODELS_DIR=str(models))
    stack.env["API_PORT_RANGE"] = stack.env["API_PORT"]
    stack.env["DEBUGPY_PORT"] = str(free_port())
    try:
        stack.up()
        stack.wait_healthy()
        info = stack.get("/api/v1/model").json()
        assert (info["architecture"], info["num_classes"], tuple(info["preprocessing"]["input_size"])) == RECORDED
        assert info["class_names"] == ["abyssinian", "bengal", "birman", "bombay", "persian"]
    finally:
        stack.down()
