"""compose.yaml and deploy/k8s/ validate: schema validators when installed, structural checks always."""
from __future__ import annotations

import copy
import os
import shutil
import subprocess

import pytest
import yaml

from tests.deploy import checks

K8S_VERSION = "1.30.0"  # grpc probes are GA since 1.27


@pytest.fixture(scope="module")
def compose():
    return checks.load_compose()


@pytest.fixture(scope="module")
def k8s():
    return checks.load_k8s()


def test_compose_fits_together(compose):
    assert checks.compose_problems(compose) == []


def test_compose_has_the_promised_services(compose):
    services = compose["services"]
    assert {"postgres", "adapter-store", "router", "worker", "worker-2", "model-init", "otel-collector"} <= set(services)
    assert "telemetry" in services["otel-collector"]["profiles"]
    assert "postgresql+psycopg://" in " ".join(services["adapter-store"]["command"])
    assert services["postgres"]["healthcheck"]["test"][-1].startswith("pg_isready")
    assert (checks.ROOT / "deploy" / "otel-collector.yaml").is_file()
    # the workers keep Triton's compiled kernels on a volume at the image's TRITON_CACHE_DIR
    cache_dir = next(line.split("=", 1)[1] for line in (checks.ROOT / "Dockerfile").read_text().splitlines()
                     if line.startswith("ENV TRITON_CACHE_DIR="))
    for name in ("worker", "worker-2"):
        assert f"kernel-cache:{cache_dir}" in services[name]["volumes"], name


@pytest.mark.parametrize("break_it, expected", [
    (lambda c: c["services"]["adapter-store"].pop("healthcheck"), "no healthcheck"),
    (lambda c: c["services"]["router"]["command"].__setitem__(0, "serve"), "not an `openlora` subcommand"),
    (lambda c: c["services"]["router"]["command"].extend(["--colour", "red"]), "--colour"),
    (lambda c: c["services"]["worker"]["command"].__setitem__(6, "store:50052"), "no service listening"),
    (lambda c: c["services"]["router"].__setitem__("ports", ["50051:50051"]), "--scale router=2"),
    (lambda c: c["services"]["worker"].pop("deploy"), "GPU reservation"),
    (lambda c: c["services"]["router"]["depends_on"].__setitem__("otel-collector", {"condition": "service_healthy"}),
     "no healthcheck"),
    (lambda c: c["services"]["router"]["environment"].__setitem__("OPENLORA_NOPE", "1"), "read by no code"),
])
def test_compose_checks_catch_mistakes(compose, break_it, expected):
    broken = copy.deepcopy(compose)
    break_it(broken)
    assert any(expected in p for p in checks.compose_problems(broken)), checks.compose_problems(broken)


def test_docker_compose_config_validates():
    """Debian's docker-compose (v1.29, compose-spec schema); .ci/validate-deploy.sh installs it."""
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose not installed (apt-get install docker-compose; .ci/validate-deploy.sh does)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENLORA_", "OTEL_", "COMPOSE_"))}
    for profiles in ([], ["--profile", "multi-gpu", "--profile", "telemetry"]):
        result = subprocess.run([exe, "-f", str(checks.COMPOSE), *profiles, "config", "-q"], check=False,
                                cwd=checks.ROOT,
                                env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr


def test_k8s_fits_together(k8s):
    kustomization = yaml.safe_load((checks.K8S / "kustomization.yaml").read_text())
    assert checks.k8s_problems(k8s, kustomization) == []


def test_k8s_has_the_promised_objects(k8s):
    kinds = {(d["kind"], d["metadata"]["name"]) for docs in k8s.values() for d in docs}
    assert {("Deployment", "openlora-router"), ("Service", "openlora-router"),
            ("HorizontalPodAutoscaler", "openlora-router"), ("StatefulSet", "openlora-worker"),
            ("Service", "openlora-worker-headless"), ("Deployment", "openlora-store"),
            ("PersistentVolumeClaim", "openlora-blobs"), ("StatefulSet", "openlora-postgres"),
            ("ConfigMap", "openlora-env"), ("Namespace", "openlora")} <= kinds
    assert (checks.K8S / "README.md").is_file()
    worker = _doc(k8s, "StatefulSet", "openlora-worker")["spec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in worker["containers"][0]["volumeMounts"]}
    assert mounts["kernel-cache"] == "/data/kernel-cache" and any(v["name"] == "kernel-cache" for v in worker["volumes"])


def _doc(files, kind, name):
    return next(d for docs in files.values() for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def _container(files, kind, name):
    return _doc(files, kind, name)["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("break_it, expected", [
    (lambda f: _doc(f, "Deployment", "openlora-router")["spec"]["selector"]["matchLabels"].__setitem__("x", "y"),
     "selector does not match"),
    (lambda f: _container(f, "StatefulSet", "openlora-worker")["resources"]["limits"].pop("nvidia.com/gpu"),
     "exactly one GPU"),
    (lambda f: _container(f, "Deployment", "openlora-router")["readinessProbe"]["grpc"].__setitem__("port", 1),
     "grpc probe"),
    (lambda f: _container(f, "Deployment", "openlora-router").pop("livenessProbe"), "probes are required"),
    (lambda f: _container(f, "Deployment", "openlora-router")["args"].__setitem__(4, "dns:///openlora-router:50051"),
     "headless"),
    (lambda f: _doc(f, "Service", "openlora-store")["spec"]["ports"][0].__setitem__("targetPort", "http"),
     "no container port"),
    (lambda f: _doc(f, "HorizontalPodAutoscaler", "openlora-router")["spec"]["scaleTargetRef"]
     .__setitem__("name", "gone"), "scales unknown"),
    (lambda f: _container(f, "Deployment", "openlora-store").pop("resources"), "requests and limits"),
])
def test_k8s_checks_catch_mistakes(k8s, break_it, expected):
    broken = copy.deepcopy(k8s)
    break_it(broken)
    assert any(expected in p for p in checks.k8s_problems(broken)), checks.k8s_problems(broken)


def test_k8s_schema_validates(k8s):
    """Every object against the Kubernetes OpenAPI schema (strict: no unknown fields)."""
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate "
                                                          "(.ci/validate-deploy.sh does)")
    for name, docs in k8s.items():
        for doc in docs:
            try:
                kv.validate(doc, K8S_VERSION, strict=True)
            except kv.ValidationError as err:
                pytest.fail(f"{name} {doc['kind']}/{doc['metadata']['name']}: {err}")
