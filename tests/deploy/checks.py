"""Structural checks of compose.yaml and deploy/k8s/ that no schema catches.

A schema says a key is well formed; these say the pieces fit: commands name real
`openlora` subcommands and flags, addresses point at services that listen there,
healthchecks exist where something waits on them, selectors match their pods...
Used by tests/deploy and by .ci/validate-deploy.sh (`python -m tests.deploy.checks`),
which falls back on them alone when no validator could be installed.
"""
from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import yaml

from services.cli import _SUBCOMMANDS

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"
K8S = ROOT / "deploy" / "k8s"
CODE_DIRS = ("services", "adapter_store", "router", "inference_worker", "kernels")

# Flags of the service subcommands as documented while their CLIs are being written;
# once a CLI is real, its own parser judges instead (see _command_problems).
DOCUMENTED_FLAGS = {
    "store": {"--listen", "--data", "--db-url"},
    "worker": {"--listen", "--model", "--store", "--device"},
    "router": {"--listen", "--workers"},
}


def is_placeholder(subcommand: str) -> bool:
    module = _SUBCOMMANDS[subcommand][0]
    return "not implemented yet" in (ROOT / (module.replace(".", "/") + ".py")).read_text()


def env_vars_read_by_code() -> set[str]:
    names = set()
    for folder in CODE_DIRS:
        for path in (ROOT / folder).rglob("*.py"):
            names |= set(re.findall(r"OPENLORA_[A-Z0-9_]+", path.read_text()))
    return names


def flag_value(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args and args.index(flag) + 1 < len(args) else None


def _command_problems(where: str, args: list[str]) -> list[str]:
    if not args or args[0] not in _SUBCOMMANDS:
        return [f"{where}: {args[:1]} is not an `openlora` subcommand ({sorted(_SUBCOMMANDS)})"]
    sub = args[0]
    if sub in DOCUMENTED_FLAGS and is_placeholder(sub):
        flags = {a for a in args[1:] if a.startswith("--")}
        unknown = flags - DOCUMENTED_FLAGS[sub]
        return [f"{where}: undocumented flags {sorted(unknown)} for `{sub}`"] if unknown else []
    parser = importlib.import_module("services.cli").build_parser()
    try:
        parser.parse_args(args)
    except SystemExit:
        return [f"{where}: `openlora {' '.join(args)}` does not parse"]
    return []


def _port(address: str) -> str:
    return address.rpartition(":")[2]


# ---------------------------------------------------------------- compose

def load_compose(path: Path = COMPOSE) -> dict:
    return yaml.safe_load(path.read_text())


def interpolate(value: str) -> str:
    """${VAR:-default} / ${VAR} with an empty environment, as `docker-compose config` would."""
    return re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", lambda m: m.group(2) or "", value)


def compose_commands(compose: dict) -> dict[str, list[str]]:
    """service -> its `openlora` arguments, for the services run from our image."""
    image = compose.get("x-openlora", {}).get("image")
    return {name: [interpolate(str(a)) for a in svc.get("command", [])]
            for name, svc in compose["services"].items() if svc.get("image") == image}


def network_names(services: dict) -> dict[str, set[str]]:
    """service -> the names it answers to on the compose network (its own and its aliases)."""
    return {name: {name, *((svc.get("networks") or {}).get("default") or {}).get("aliases", [])}
            for name, svc in services.items()}


def _healthy(svc: dict) -> bool:
    check = svc.get("healthcheck")
    return bool(check) and not check.get("disable") and check.get("test") not in (["NONE"], "NONE")


def compose_problems(compose: dict) -> list[str]:
    services = compose.get("services", {})
    volumes = set(compose.get("volumes") or {})
    commands = compose_commands(compose)
    problems = []
    aliases = network_names(services)
    listen = {name: _port(flag_value(args, "--listen") or "") for name, args in commands.items()}
    depended_on = {dep for svc in services.values() for dep in (svc.get("depends_on") or {})}
    known_env = env_vars_read_by_code()
    for name, svc in services.items():
        where = f"compose service {name}"
        one_shot = svc.get("restart") == "no"
        if not one_shot and not _healthy(svc) and (name in depended_on or name in commands):
            problems.append(f"{where}: no healthcheck")
        for dep, spec in (svc.get("depends_on") or {}).items():
            condition = spec.get("condition") if isinstance(spec, dict) else None
            if dep not in services:
                problems.append(f"{where}: depends on unknown service {dep}")
            elif condition == "service_healthy" and not _healthy(services[dep]):
                problems.append(f"{where}: waits for {dep} to be healthy, but it has no healthcheck")
            elif condition == "service_completed_successfully" and services[dep].get("restart") != "no":
                problems.append(f"{where}: waits for {dep} to complete, but it restarts")
            elif condition not in ("service_healthy", "service_completed_successfully"):
                problems.append(f"{where}: depends on {dep} without a health condition")
            elif services[dep].get("profiles") and services[dep]["profiles"] != svc.get("profiles"):
                problems.append(f"{where}: depends on {dep}, which only starts with a profile")
        for mount in svc.get("volumes") or []:
            source = mount.split(":")[0]
            if not source.startswith((".", "/")) and source not in volumes:
                problems.append(f"{where}: volume {source} is not declared")
        env = svc.get("environment") or {}
        for key in env:
            if key.startswith("OPENLORA_") and key not in known_env:
                problems.append(f"{where}: {key} is read by no code")
        if name not in commands:
            continue
        args = commands[name]
        problems += _command_problems(where, args)
        test = (svc.get("healthcheck") or {}).get("test") or []
        if not one_shot and ("services.healthcheck" not in test or _port(test[-1]) != listen[name]):
            problems.append(f"{where}: healthcheck must probe grpc health on its --listen port {listen[name]}")
        targets = [flag_value(args, "--store"), env.get("OPENLORA_STORE"), flag_value(args, "--workers")]
        for target in filter(None, targets):
            host, port = target.removeprefix("dns:///").rsplit(":", 1)
            serving = [s for s, names in aliases.items() if host in names and listen.get(s) == port]
            if not serving:
                problems.append(f"{where}: {target} is no service listening on that port")
        if args[0] == "worker" and "--device" in args and flag_value(args, "--device") != "cpu":
            devices = svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
            if not devices:
                problems.append(f"{where}: a GPU worker without a GPU reservation")
        if args[0] == "router":
            for port in svc.get("ports") or []:
                published = str(port).rsplit(":", 1)[0]
                if "-" not in interpolate(published):
                    problems.append(f"{where}: fixed host port {port}: `--scale router=2` would collide")
    return problems


# ---------------------------------------------------------------- kubernetes

def load_k8s(folder: Path = K8S) -> dict[str, list[dict]]:
    """file name -> its documents (kustomization.yaml left out)."""
    return {path.name: [d for d in yaml.safe_load_all(path.read_text()) if d]
            for path in sorted(folder.glob("*.yaml")) if path.name != "kustomization.yaml"}


def _pod_spec(doc: dict) -> dict | None:
    return doc["spec"]["template"]["spec"] if doc["kind"] in ("Deployment", "StatefulSet") else None


def k8s_problems(files: dict[str, list[dict]], kustomization: dict | None = None) -> list[str]:
    docs = [d for file_docs in files.values() for d in file_docs]
    by_kind: dict[str, dict[str, dict]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
    namespaces = set(by_kind.get("Namespace", {}))
    problems = []
    if kustomization is not None and sorted(kustomization.get("resources", [])) != sorted(files):
        problems.append(f"kustomization resources {kustomization.get('resources')} != files {sorted(files)}")
    workloads = {**by_kind.get("Deployment", {}), **by_kind.get("StatefulSet", {})}
    for d in docs:
        where = f"{d['kind']}/{d['metadata']['name']}"
        if d["kind"] != "Namespace" and d["metadata"].get("namespace") not in namespaces:
            problems.append(f"{where}: namespace {d['metadata'].get('namespace')} is not declared")
        if d["kind"] == "Service":
            problems += _service_problems(where, d, workloads)
        if d["kind"] == "HorizontalPodAutoscaler":
            ref = d["spec"]["scaleTargetRef"]
            if ref["name"] not in by_kind.get(ref["kind"], {}):
                problems.append(f"{where}: scales unknown {ref['kind']}/{ref['name']}")
        pod = _pod_spec(d)
        if pod is None:
            continue
        labels = d["spec"]["template"]["metadata"].get("labels", {})
        if not d["spec"]["selector"]["matchLabels"].items() <= labels.items():
            problems.append(f"{where}: selector does not match the pod template's labels")
        if d["kind"] == "StatefulSet":
            headless = by_kind.get("Service", {}).get(d["spec"]["serviceName"])
            if headless is None or headless["spec"].get("clusterIP") != "None":
                problems.append(f"{where}: serviceName {d['spec']['serviceName']} is no headless Service")
        claims = {c["metadata"]["name"] for c in d["spec"].get("volumeClaimTemplates", [])}
        volumes = {v["name"] for v in pod.get("volumes", [])} | claims
        for v in pod.get("volumes", []):
            claim = v.get("persistentVolumeClaim", {}).get("claimName")
            if claim and claim not in by_kind.get("PersistentVolumeClaim", {}):
                problems.append(f"{where}: volume {v['name']} claims unknown PVC {claim}")
        for c in pod.get("initContainers", []) + pod["containers"]:
            problems += _container_problems(f"{where}/{c['name']}", c, c in pod["containers"], volumes, by_kind)
    return problems


def _service_problems(where: str, svc: dict, workloads: dict) -> list[str]:
    selector = svc["spec"].get("selector", {})
    pods = [w for w in workloads.values() if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
    if not pods:
        return [f"{where}: selector {selector} matches no workload"]
    names = {p.get("name") for w in pods for c in _pod_spec(w)["containers"] for p in c.get("ports", [])}
    numbers = {p["containerPort"] for w in pods for c in _pod_spec(w)["containers"] for p in c.get("ports", [])}
    return [f"{where}: targetPort {p.get('targetPort')} is no container port"
            for p in svc["spec"]["ports"] if p.get("targetPort", p["port"]) not in names | numbers]


def _container_problems(where: str, c: dict, is_main: bool, volumes: set, by_kind: dict) -> list[str]:
    problems = []
    resources = c.get("resources", {})
    if not resources.get("requests") or not resources.get("limits"):
        problems.append(f"{where}: resource requests and limits are required")
    if is_main and not (c.get("readinessProbe") and c.get("livenessProbe")):
        problems.append(f"{where}: readiness and liveness probes are required")
    for m in c.get("volumeMounts", []):
        if m["name"] not in volumes:
            problems.append(f"{where}: mounts unknown volume {m['name']}")
    for ref in c.get("envFrom", []):
        kind, name = ("ConfigMap", ref["configMapRef"]["name"]) if "configMapRef" in ref \
            else ("Secret", ref["secretRef"]["name"])
        if name not in by_kind.get(kind, {}):
            problems.append(f"{where}: envFrom unknown {kind} {name}")
    for env in c.get("env", []):
        ref = env.get("valueFrom", {}).get("secretKeyRef")
        if ref and ref["key"] not in by_kind.get("Secret", {}).get(ref["name"], {}).get("stringData", {}):
            problems.append(f"{where}: env {env['name']} refers to a missing secret key")
    if not c["image"].startswith("openlora"):
        return problems
    args = c.get("args", [])
    problems += _command_problems(where, args)
    if not is_main or args[:1] == ["init-model"]:
        return problems
    port = _port(flag_value(args, "--listen") or "")
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        if probe in c and str(c[probe].get("grpc", {}).get("port")) != port:
            problems.append(f"{where}: {probe} must be a grpc probe on the --listen port {port}")
    if args[0] == "worker" and str(resources.get("limits", {}).get("nvidia.com/gpu")) != "1":
        problems.append(f"{where}: a worker takes exactly one GPU (limits nvidia.com/gpu: 1)")
    for target in filter(None, (flag_value(args, "--store"), flag_value(args, "--workers"))):
        host, target_port = target.removeprefix("dns:///").rsplit(":", 1)
        name, _, rest = host.partition(".")
        svc = by_kind.get("Service", {}).get(name)
        ns = rest.split(".")[0] if rest else None
        if svc is None or (ns and ns != svc["metadata"]["namespace"]) or \
                int(target_port) not in {p["port"] for p in svc["spec"]["ports"]}:
            problems.append(f"{where}: {target} is no Service port of this deployment")
        elif flag_value(args, "--workers") == target and svc["spec"].get("clusterIP") != "None":
            problems.append(f"{where}: --workers must name a headless Service (one DNS record per worker)")
    return problems


def main() -> int:
    problems = compose_problems(load_compose())
    problems += k8s_problems(load_k8s(), yaml.safe_load((K8S / "kustomization.yaml").read_text()))
    for problem in problems:
        print(problem)
    print(f"structural checks: {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
