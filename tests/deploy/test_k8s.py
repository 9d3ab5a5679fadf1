"""The Kubernetes manifests (deploy/k8s), validated offline: no cluster and no registry here.

Every overlay and component combination is rendered with `kubectl kustomize`, validated with
kubernetes-validate (strict, Kubernetes 1.30 and the newest schema it bundles; CRD kinds on an
explicit allow-list), scanned with checkov (each skip carries a written reason in the manifest),
and checked against the app itself: probe routes exist in its OpenAPI document, ports and uid
match the Dockerfile, every env name is a real setting, the grace period covers the drain.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from api.config import environment_names
from api.main import create_app
from tests.helpers import make_settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
KUBECTL = shutil.which("kubectl")
# Custom resources: no schema in kubernetes-validate; each is checked by the rules below instead.
CRD_KINDS = {"ScaledObject", "ServiceMonitor", "InferenceService"}
EXTRAS = ["keda", "servicemonitor", "networkpolicy", "api-key"]
RENDERS: dict[str, tuple[str, list[str]]] = {
    "gpu": ("overlays/gpu", []),
    "cpu": ("overlays/cpu", []),
    **{f"gpu+{c}": ("overlays/gpu", [c]) for c in [*EXTRAS, "model-init"]},
    **{f"cpu+{c}": ("overlays/cpu", [c]) for c in [*EXTRAS, "model-init"]},
    "gpu+all": ("overlays/gpu", EXTRAS),
    "cpu+all": ("overlays/cpu", EXTRAS),
    "base+models-pvc": ("base", ["models-pvc"]),
    "base+model-init": ("base", ["model-init"]),
}

pytestmark = pytest.mark.skipif(
    KUBECTL is None and os.environ.get("REQUIRE_KUBECTL") != "1", reason="kubectl (with kustomize) not installed"
)


@cache
def render(name: str, workdir: Path) -> list[dict[str, Any]]:
    target, components = RENDERS[name]
    folder = K8S / target
    if components:  # a throwaway kustomization: the target plus the components
        folder = workdir / name
        folder.mkdir(parents=True, exist_ok=True)
        relative = os.path.relpath(K8S, folder)
        (folder / "kustomization.yaml").write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "kustomize.config.k8s.io/v1beta1",
                    "kind": "Kustomization",
                    "resources": [f"{relative}/{target}"],
                    "components": [f"{relative}/components/{c}" for c in components],
                }
            )
        )
    assert KUBECTL, "kubectl is required (REQUIRE_KUBECTL=1)"
    result = subprocess.run([KUBECTL, "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{name}: {result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kustomize")


def _kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def _deployment(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = _kind(docs, "Deployment")
    return deployment


def _config(docs: list[dict[str, Any]]) -> dict[str, str]:
    (config,) = _kind(docs, "ConfigMap")
    return config["data"]


@cache
def _app_paths() -> set[str]:
    app = create_app(make_settings(checkpoint_path="unused.pt"))
    return set(app.openapi()["paths"])


def _dockerfile(pattern: str) -> str:
    match = re.search(pattern, (ROOT / "Dockerfile").read_text(), flags=re.MULTILINE)
    assert match, pattern
    return match.group(1)


# --- render and validate --------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(RENDERS))
def test_renders_and_validates_strictly(name: str, workdir: Path) -> None:
    docs = render(name, workdir)
    for version in ("1.30.0", kubernetes_validate.latest_version()):
        for doc in docs:
            if doc["kind"] in CRD_KINDS:
                continue
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']} invalid for {version}: {error.message}")
    unknown = {doc["kind"] for doc in docs} - CRD_KINDS
    assert unknown <= {
        "Namespace", "ConfigMap", "Service", "Deployment", "PodDisruptionBudget", "HorizontalPodAutoscaler",
        "PersistentVolumeClaim", "NetworkPolicy",
    }, unknown  # fmt: skip


def test_a_misspelled_field_is_caught(workdir: Path) -> None:
    """The validation above can fail: strict mode rejects a field Kubernetes does not know."""
    deployment = json.loads(json.dumps(_deployment(render("gpu", workdir))))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/", "port": 80}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, "1.30.0", strict=True)


def test_checkov_passes_with_written_reasons(workdir: Path, tmp_path: Path) -> None:
    checkov = os.environ.get("CHECKOV") or shutil.which("checkov")
    if checkov is None:
        pytest.skip("checkov not installed (make test installs it into .venv-checkov)")
    for name in ("gpu", "cpu", "gpu+all", "base+model-init"):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump_all(render(name, workdir)))
    result = subprocess.run(
        [checkov, "--directory", str(tmp_path), "--framework", "kubernetes", "--skip-download",
         "--output", "json", "--quiet", "--compact"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    report = json.loads(result.stdout)
    reports = report if isinstance(report, list) else [report]
    failed = [
        f"{check['check_id']} {check['resource']} ({check['file_path']}): {check['check_name']}"
        for entry in reports
        for check in entry.get("results", {}).get("failed_checks", [])
    ]
    assert not failed, "\n".join(failed)
    skipped = [check for entry in reports for check in entry.get("results", {}).get("skipped_checks", [])]
    assert all(len(check.get("suppress_comment", "")) > 20 for check in skipped), "every skip needs a reason"
    assert sum(entry.get("summary", {}).get("passed", 0) for entry in reports) > 50


# --- rules ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(RENDERS))
def test_probes_ports_env_and_grace_period_match_the_app(name: str, workdir: Path) -> None:
    docs = render(name, workdir)
    pod = _deployment(docs)["spec"]["template"]["spec"]
    (server,) = pod["containers"]
    ports = {port["name"]: port["containerPort"] for port in server["ports"]}
    expose = int(_dockerfile(r"^EXPOSE (\d+)"))
    assert ports == {"http": expose} and expose == make_settings().port
    paths = _app_paths()
    probes = {kind: server[kind]["httpGet"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    for kind, probe in probes.items():
        assert probe["path"] in paths and probe["port"] in ("http", expose), (kind, probe)
    assert probes["livenessProbe"]["path"] == "/health/live"  # never the model's readiness
    assert probes["readinessProbe"]["path"] == probes["startupProbe"]["path"] == "/health/ready"
    startup = server["startupProbe"]
    budget = startup["periodSeconds"] * startup["failureThreshold"]
    assert budget >= 300, "the startup probe must cover a slow model load (minutes)"
    assert _deployment(docs)["spec"]["progressDeadlineSeconds"] > budget
    config = _config(docs)
    names = set(config) | {env["name"] for env in server.get("env", [])}
    assert names <= environment_names(), names - environment_names()
    assert config["API_PORT"] == str(expose) and config["API_HOST"] == "0.0.0.0"
    drain = float(config["API_SHUTDOWN_DELAY_S"]) + float(config["API_GRACEFUL_TIMEOUT_S"])
    pre_stop = server["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > pre_stop + drain
    service = _kind(docs, "Service")[0]
    assert service["spec"]["ports"][0]["targetPort"] == "http"


@pytest.mark.parametrize("name", sorted(RENDERS))
def test_restricted_security_everywhere(name: str, workdir: Path) -> None:
    pod = _deployment(render(name, workdir))["spec"]["template"]["spec"]
    uid = int(_dockerfile(r"^ARG APP_UID=(\d+)"))
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == uid
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    assert pod["topologySpreadConstraints"][0]["topologyKey"] == "kubernetes.io/hostname"
    for container in pod["containers"] + pod.get("initContainers", []):
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False and context["readOnlyRootFilesystem"] is True
        assert context["capabilities"]["drop"] == ["ALL"]
        image = container["image"]
        assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), image
        assert container["resources"]["limits"] and container["resources"]["requests"]
    mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["/app/models"]["readOnly"] is True
    assert {"/tmp", "/app/logs", "/home/appuser/.cache"} <= set(mounts)


@pytest.mark.parametrize("name", sorted(RENDERS))
def test_gpu_and_cpu_overlays(name: str, workdir: Path) -> None:
    docs = render(name, workdir)
    pod = _deployment(docs)["spec"]["template"]["spec"]
    limits = pod["containers"][0]["resources"]["limits"]
    if name.startswith("gpu"):
        assert limits["nvidia.com/gpu"] == 1
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        assert any(key.startswith("nvidia.com/") for key in pod["nodeSelector"])
        # a rollout must not need a spare GPU
        assert _deployment(docs)["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
        assert _config(docs)["API_DEVICE"] == "cuda"
    elif name.startswith("cpu"):
        assert "nvidia.com" not in yaml.safe_dump_all(docs)
        assert _config(docs)["API_DEVICE"] == "cpu"


@pytest.mark.parametrize("name", sorted(RENDERS))
def test_autoscaling_disruption_and_model_source(name: str, workdir: Path) -> None:
    docs = render(name, workdir)
    (pdb,) = _kind(docs, "PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1" and pdb["spec"] == {**pdb["spec"], "maxUnavailable": 1}
    assert "minAvailable" not in pdb["spec"]
    hpas, scaled = _kind(docs, "HorizontalPodAutoscaler"), _kind(docs, "ScaledObject")
    if "keda" in name or name.endswith("+all"):
        assert not hpas and len(scaled) == 1  # KEDA owns the HPA
        assert "cat_breeds_api_queue_depth" in scaled[0]["spec"]["triggers"][0]["metadata"]["query"]
    else:
        (hpa,) = hpas
        assert hpa["apiVersion"] == "autoscaling/v2" and not scaled
        assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300
    volumes = {v["name"]: v for v in _deployment(docs)["spec"]["template"]["spec"]["volumes"]}
    if "model-init" in name:
        assert set(volumes["models"]) == {"name", "emptyDir"}
        init = _deployment(docs)["spec"]["template"]["spec"]["initContainers"][0]
        assert {"name": "models", "mountPath": "/app/models"} in init["volumeMounts"]
    elif name != "base":
        assert volumes["models"]["persistentVolumeClaim"] == {"claimName": "cat-breeds-api-models", "readOnly": True}
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "cat-breeds-api", doc["kind"]


@pytest.mark.parametrize("name", ["inferenceservice.yaml", "inferenceservice-v2.yaml"])
def test_kserve_examples_probe_the_app_routes(name: str) -> None:
    (isvc,) = list(yaml.safe_load_all((K8S / "kserve" / name).read_text()))
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService"
    (container,) = isvc["spec"]["predictor"]["containers"]
    assert container["name"] == "kserve-container"
    env = {item["name"]: item.get("value") for item in container["env"]}
    port = container["ports"][0]["containerPort"]
    assert port == int(env.get("API_PORT") or _dockerfile(r"^EXPOSE (\d+)"))
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container[kind]["httpGet"]
        assert probe["path"] in _app_paths() and probe["port"] == port, kind
    names = set(env) - {"STORAGE_URI", "PROTOCOL"}  # KServe's own
    assert names <= environment_names(), names - environment_names()
    assert not container["image"].endswith(":latest")
    if env.get("PROTOCOL") == "v2":  # KServe reads it to treat the container as a v2 predictor
        assert all(
            container[k]["httpGet"]["path"].startswith("/v2/health/") for k in ("readinessProbe", "livenessProbe")
        )
        assert isvc["metadata"]["annotations"]["prometheus.kserve.io/port"] == str(port)
        assert isvc["metadata"]["annotations"]["prometheus.kserve.io/path"] in _app_paths()
