"""deploy/k8s: every variant renders with a real kustomize, validates against the Kubernetes schemas,
and says to the services what their real command line and configuration accept."""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

import k8s_manifests as km
from zeroc.config import REPO_ROOT, ServerConfig

# Oldest and newest Kubernetes the manifests are checked against (grpc probes are GA since 1.27).
K8S_VERSIONS = ("1.30.0", "1.37.0")
PREFILL, DECODE, GATEWAY = "zeroc-prefill", "zeroc-decode", "zeroc-gateway"
TLS_VARIANTS = [v for v in km.VARIANTS if "tls" in v]


@functools.lru_cache(maxsize=1)
def _renders() -> dict[str, list[dict]]:
    """Every variant, rendered once per session (collection needs them for the parameters too)."""
    with tempfile.TemporaryDirectory(prefix="zeroc-kustomize-") as scratch:
        return {v: km.render(v, Path(scratch) / v.replace("+", "_")) for v in km.VARIANTS}


@pytest.fixture
def renders() -> dict[str, list[dict]]:
    return copy.deepcopy(_renders())


def test_every_rendered_manifest_validates(renders):
    import kubernetes_validate

    checked = 0
    for variant, docs in renders.items():
        for doc in docs:
            for version in K8S_VERSIONS:
                kubernetes_validate.validate(doc, version, strict=True)  # raises ValidationError
                checked += 1
    assert checked >= len(km.VARIANTS) * 10 * len(K8S_VERSIONS)


def test_the_validator_rejects_a_broken_manifest(renders):
    """The oracle bites: a misspelled field and a string port are refused."""
    import kubernetes_validate

    deployment = km.find(renders["cpu"], "Deployment", DECODE)
    typo = copy.deepcopy(deployment)
    typo["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpcc"] = {"port": 50051}
    bad_port = copy.deepcopy(deployment)
    bad_port["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["grpc"]["port"] = "grpc"
    for doc in (typo, bad_port):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)


def _names_in_manifests(kind: str) -> list[str]:
    """Every ZEROC_* variable the manifests give a service (kind: "service") or the gateway."""
    names = set()
    for docs in _renders().values():
        targets = [PREFILL, DECODE] if kind == "service" else [GATEWAY]
        for name in targets:
            if km.find(docs, "Deployment", name):
                names |= {k for k in km.pod_env(docs, km.container(docs, name)) if k.startswith("ZEROC_")}
    return sorted(names)


@pytest.mark.parametrize("name", _names_in_manifests("service"))
def test_service_variable_is_a_setting(name):
    """Each ZEROC_* variable of the prefill and decode pods is one `ZeroCConfig.from_env` reads (a
    misspelt one would be ignored silently)."""
    assert name in km.config_env_names(), f"{name} is not a ZeroCConfig setting (zeroc/config/settings.py)"


@pytest.mark.parametrize("name", _names_in_manifests("gateway"))
def test_gateway_variable_is_a_setting(name):
    assert name in km.gateway_env_names(), f"{name} is not a GatewaySettings variable (zeroc/gateway/command.py)"


def _service_config(monkeypatch, c: dict, env: dict[str, str]):
    """The config the container's command builds, through the CLI's own parser and `service_config`."""
    from zeroc.cli import build_parser, common

    assert c["command"] == ["zeroc"], c["command"]
    args = build_parser().parse_args(c["args"])
    for key in [k for k in os.environ if k.startswith("ZEROC_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return common.service_config(args)


def _check_probes(c: dict, port: int, service_name: str, tls: bool) -> None:
    """Startup and liveness ask grpc.health.v1 about the server (""), readiness about the service, all
    on the gRPC port; with TLS through the exec probe (kubelet's grpc probes speak plaintext only)."""
    expected = {"startupProbe": "", "livenessProbe": "", "readinessProbe": service_name}
    for probe, name in expected.items():
        spec = c[probe]
        if tls:
            command = spec["exec"]["command"]
            assert command[:2] == ["python3", "-c"] and command[3:] == [f"localhost:{port}", name], command
        else:
            assert spec["grpc"] == ({"port": port, "service": name} if name else {"port": port}), (probe, spec)
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 300, \
        "a model load gets at least five minutes before liveness starts"


@pytest.mark.parametrize("variant", list(km.VARIANTS))
@pytest.mark.parametrize("kind", ["prefill", "decode"])
def test_service_pods_agree_with_the_cli(renders, monkeypatch, variant, kind):
    import decode_service.server
    import prefill_service.server

    docs = renders[variant]
    tls = "tls" in variant
    c = km.container(docs, f"zeroc-{kind}")
    env = km.pod_env(docs, c)
    cfg = _service_config(monkeypatch, c, env)
    assert c["args"] == ["serve", kind]
    ports = km.ports(c)
    assert cfg.server.host == "0.0.0.0" and cfg.server.port == ports["grpc"]
    assert cfg.server.port == ServerConfig().port, "the pods listen where `zeroc serve` does by default"
    module = prefill_service.server if kind == "prefill" else decode_service.server
    _check_probes(c, cfg.server.port, module.SERVICE_NAME, tls)
    internal = ports["grpc-internal"] if tls else ports["grpc"]
    if tls:
        assert cfg.security.internal_port == internal and cfg.security.allow_plaintext == "loopback"
        mount = next(m["mountPath"] for m in c["volumeMounts"] if m["name"] == "tls")
        assert (cfg.security.tls_ca, cfg.security.tls_cert, cfg.security.tls_key) == (
            f"{mount}/ca.crt", f"{mount}/tls.crt", f"{mount}/tls.key")  # the kubernetes.io/tls layout
    else:
        assert cfg.security.allow_plaintext == "any" and not cfg.security.tls_cert
        assert "grpc-internal" not in ports
    # Peers fetch KV blocks at the advertised address: this pod, on the port internal RPCs take.
    assert cfg.store.advertise == f"{km.POD_IP}:{internal}"
    mount = next(m["mountPath"] for m in c["volumeMounts"] if m["name"] == "cluster-key")
    assert cfg.security.cluster_key_file == f"{mount}/cluster-key"
    # The metrics port (env ZEROC_METRICS_PORT) is the container port `metrics` Prometheus scrapes.
    annotations = km.find(docs, "Deployment", f"zeroc-{kind}")["spec"]["template"]["metadata"]["annotations"]
    assert int(env["ZEROC_METRICS_PORT"]) == ports["metrics"] == int(annotations["prometheus.io/port"])
    assert annotations["prometheus.io/scrape"] == "true"
    _check_redis(docs, cfg.redis.url, "external-redis" in variant)
    if kind == "decode":
        _check_prefill_target(docs, cfg.transfer.prefill_target, tls)


def _check_redis(docs: list[dict], url: str, external: bool) -> None:
    if external:
        assert url == km.SECRET_VALUE and km.find(docs, "StatefulSet", "zeroc-redis") is None
        return
    parts = urlsplit(url)
    svc, port = km.service_port(docs, parts.hostname, parts.port)
    [redis] = km.selected(docs, svc)
    assert redis["kind"] == "StatefulSet"
    assert km.ports(redis["spec"]["template"]["spec"]["containers"][0])[port["targetPort"]] == 6379


def _check_prefill_target(docs: list[dict], target: str, tls: bool) -> None:
    """The decode pods' prefill target is a Service port that reaches the prefill pods' internal port."""
    host, port = target.rsplit(":", 1)
    svc, svc_port = km.service_port(docs, host, int(port))
    [prefill] = km.selected(docs, svc)
    assert prefill["metadata"]["name"] == PREFILL
    wanted = "grpc-internal" if tls else "grpc"
    assert svc_port["targetPort"] == wanted and svc_port["appProtocol"] == "grpc"


@pytest.mark.parametrize("variant", list(km.VARIANTS))
def test_termination_grace_covers_prestop_and_drain(renders, monkeypatch, variant):
    """SIGTERM comes after preStop; the service then drains for grace_s (ZEROC_SERVER_GRACE_S or
    ZEROC_GATEWAY_GRACE_S). The pod's grace period must cover both, or in-flight requests are killed."""
    from zeroc.gateway.command import GatewaySettings

    docs = renders[variant]
    for name in (PREFILL, DECODE, GATEWAY):
        deployment = km.find(docs, "Deployment", name)
        c = km.container(docs, name)
        env = km.pod_env(docs, c)
        drain = (GatewaySettings.from_env(env).grace_s if name == GATEWAY
                 else _service_config(monkeypatch, c, env).server.grace_s)
        hold = km.probe_sleep_s(c)
        assert hold >= 3, "endpoints and the mesh need a few seconds to stop routing to the pod"
        assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= hold + drain + 3, name


def test_gateway_agrees_with_its_settings(renders):
    from zeroc.cli import build_parser
    from zeroc.gateway.command import GatewaySettings

    docs = renders["cpu"]
    c = km.container(docs, GATEWAY)
    assert c["command"] == ["zeroc"] and c["args"] == ["serve", "gateway"]
    build_parser().parse_args(c["args"])
    env = km.pod_env(docs, c)
    settings = GatewaySettings.from_env(env)
    assert settings.host == "0.0.0.0" and settings.port == km.ports(c)["http"] == GatewaySettings().port
    annotations = km.find(docs, "Deployment", GATEWAY)["spec"]["template"]["metadata"]["annotations"]
    assert int(env["ZEROC_METRICS_PORT"]) == km.ports(c)["metrics"] == int(annotations["prometheus.io/port"])
    for target in settings.targets:  # dns:///NAME:PORT or NAME:PORT, a decode Service
        host, port = target.removeprefix("dns:///").rsplit(":", 1)
        svc, svc_port = km.service_port(docs, host, int(port))
        assert [d["metadata"]["name"] for d in km.selected(docs, svc)] == [DECODE]
        assert svc_port["targetPort"] == "grpc"


@pytest.mark.parametrize("variant", TLS_VARIANTS)
def test_the_tls_gateway_serves_https_reaches_the_services_over_tls_and_checks_keys(renders, variant):
    """components/tls: the gateway's settings point at the mounted kubernetes.io/tls files and token file, its own
    key comes from the tokens Secret, and its probes speak HTTPS (/health, and /ping for liveness)."""
    from zeroc.config import ZeroCConfig
    from zeroc.gateway.command import GatewaySettings

    docs = renders[variant]
    c = km.container(docs, GATEWAY)
    env = km.pod_env(docs, c)
    security = ZeroCConfig.from_env(env).security
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert (security.tls_ca, security.tls_cert, security.tls_key) == (
        f"{mounts['tls']}/ca.crt", f"{mounts['tls']}/tls.crt", f"{mounts['tls']}/tls.key")
    assert security.tokens_file == f"{mounts['tokens']}/tokens"
    token = next(e for e in c["env"] if e["name"] == "ZEROC_GATEWAY_TOKEN")["valueFrom"]["secretKeyRef"]
    assert token == {"name": "zeroc-tokens", "key": "gateway-token"} and GatewaySettings.from_env(env).token
    volumes = {v["name"]: v["secret"]["secretName"] for v in km.find(docs, "Deployment", GATEWAY)["spec"]["template"]
               ["spec"]["volumes"]}
    assert volumes == {"tls": "zeroc-tls", "tokens": "zeroc-tokens"}
    probes = {kind: c[kind]["httpGet"] for kind in ("readinessProbe", "livenessProbe")}
    assert probes["readinessProbe"]["path"] == "/health" and probes["livenessProbe"]["path"] == "/ping"
    assert all(p["scheme"] == "HTTPS" and p["port"] == "http" for p in probes.values())


@pytest.mark.parametrize("variant", list(km.VARIANTS))
def test_services(renders, variant):
    """gRPC Services say so (appProtocol), every targetPort names a port of the pods they select, and
    the headless decode Service lists the decode pods for client-side balancing."""
    docs = renders[variant]
    for svc in (d for d in docs if d["kind"] == "Service"):
        workloads = km.selected(docs, svc)
        assert workloads, f"Service {svc['metadata']['name']} selects nothing"
        for port in svc["spec"]["ports"]:
            if port["name"].startswith("grpc"):
                assert port["appProtocol"] == "grpc", svc["metadata"]["name"]
            for w in workloads:
                assert port["targetPort"] in km.ports(w["spec"]["template"]["spec"]["containers"][0])
    headless = km.find(docs, "Service", "zeroc-decode-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert [d["metadata"]["name"] for d in km.selected(docs, headless)] == [DECODE]


@pytest.mark.parametrize("variant", list(km.VARIANTS))
def test_disruption_budgets_cover_every_deployment(renders, variant):
    docs = renders[variant]
    budgets = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    for deployment in (d for d in docs if d["kind"] == "Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"].items()
        assert any(b["spec"]["selector"]["matchLabels"].items() <= labels for b in budgets), \
            deployment["metadata"]["name"]


@pytest.mark.parametrize("variant", list(km.VARIANTS))
def test_network_policies_let_the_deployment_through_and_no_one_else(renders, monkeypatch, variant):
    """Only prefill and decode pods reach the prefill service (where it takes internal RPCs) and Redis;
    the decode API and every metrics port stay open."""
    docs = renders[variant]
    labels = {name: km.find(docs, "Deployment", name)["spec"]["template"]["metadata"]["labels"]
              for name in (PREFILL, DECODE)}
    decode, prefill = km.container(docs, DECODE), km.container(docs, PREFILL)
    host, port = _service_config(monkeypatch, decode, km.pod_env(docs, decode)).transfer.prefill_target.rsplit(":", 1)
    prefill_port = km.ports(prefill)[km.service_port(docs, host, int(port))[1]["targetPort"]]
    advertised = _service_config(monkeypatch, prefill, km.pod_env(docs, prefill)).store.advertise
    fetch_port = int(advertised.rsplit(":", 1)[1])  # peers fetch the prefill service's blocks there
    stranger = {"app.kubernetes.io/name": "someone-else"}
    gateway = {"app.kubernetes.io/name": "zeroc-gateway"}
    for port in (prefill_port, fetch_port):
        assert km.ingress_allowed(docs, labels[DECODE], PREFILL, port)
        assert km.ingress_allowed(docs, labels[PREFILL], PREFILL, port)
        assert not km.ingress_allowed(docs, stranger, PREFILL, port)
        assert not km.ingress_allowed(docs, gateway, PREFILL, port)
    assert km.ingress_allowed(docs, stranger, PREFILL, km.ports(prefill)["metrics"])
    assert km.ingress_allowed(docs, stranger, DECODE, km.ports(decode)["grpc"])
    if km.find(docs, "StatefulSet", "zeroc-redis"):
        for src in (DECODE, PREFILL):
            assert km.ingress_allowed(docs, labels[src], "zeroc-redis", 6379)
        assert not km.ingress_allowed(docs, gateway, "zeroc-redis", 6379)


def test_services_and_gateway_have_their_own_identities(renders):
    """A mesh policy tells the services (internal RPCs allowed) from the gateway by service account."""
    docs = renders["cpu"]
    accounts = {d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"}
    used = {name: km.find(docs, "Deployment", name)["spec"]["template"]["spec"]["serviceAccountName"]
            for name in (PREFILL, DECODE, GATEWAY)}
    assert set(used.values()) <= accounts
    assert used[PREFILL] == used[DECODE] != used[GATEWAY]


def test_gpu_overlay_asks_for_gpus(renders):
    for name in (PREFILL, DECODE):
        gpu, cpu = km.container(renders["gpu"], name), km.container(renders["cpu"], name)
        assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert "nvidia.com/gpu" not in cpu["resources"].get("limits", {})
        assert km.pod_env(renders["gpu"], gpu)["ZEROC_DEVICE"] == "cuda"
        assert km.pod_env(renders["cpu"], cpu)["ZEROC_DEVICE"] == "cpu"
        assert gpu["image"] == "zeroc:cuda" and cpu["image"] == "zeroc:cpu"


def _go_template(replacement: str) -> str:
    return re.sub(r"\$\{(\d+)\}", r"\\\1", replacement)  # ${1} -> \1


def test_hpa_reads_the_queue_metric_through_the_adapter(renders):
    """The decode HPA's Pods metric is what prometheus-adapter's rule makes of the vLLM-style series
    zeroc:num_requests_waiting; CPU is the fallback, measured against the pods' CPU requests."""
    docs = renders["cpu"]
    hpa = km.find(docs, "HorizontalPodAutoscaler", DECODE)
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": DECODE}
    pods = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert [p["metric"]["name"] for p in pods] == ["zeroc_num_requests_waiting"]
    assert any(m["type"] == "Resource" and m["resource"]["name"] == "cpu" for m in hpa["spec"]["metrics"])
    assert "cpu" in km.container(docs, DECODE)["resources"]["requests"]
    adapter = yaml.safe_load((km.K8S / "prometheus-adapter" / "values.yaml").read_text())
    exposed = {}
    for rule in adapter["rules"]["custom"]:
        series = re.match(r"[\w:]+", rule["seriesQuery"]).group(0)
        exposed[re.sub(rule["name"]["matches"], _go_template(rule["name"]["as"]), series)] = series
    assert exposed["zeroc_num_requests_waiting"] == "zeroc:num_requests_waiting"


def test_secrets_are_documented(renders):
    """Every Secret the pods mount or read has its `kubectl create secret` line in docs/deploy.md."""
    doc = (REPO_ROOT / "docs" / "deploy.md").read_text()
    names = set()
    for docs in renders.values():
        for d in (d for d in docs if d["kind"] in ("Deployment", "StatefulSet")):
            spec = d["spec"]["template"]["spec"]
            names |= {v["secret"]["secretName"] for v in spec.get("volumes", []) if "secret" in v}
            names |= {e["valueFrom"]["secretKeyRef"]["name"] for c in spec["containers"]
                      for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}
    assert names == {"zeroc-cluster-key", "zeroc-tls", "zeroc-tokens", "zeroc-redis-url"}
    for name in names:
        assert f"create secret generic {name} " in doc, name


def test_grafana_dashboard_queries_the_services_series():
    dashboard = json.loads((REPO_ROOT / "deploy" / "grafana" / "zeroc.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for series in ("zeroc:num_requests_waiting", "zeroc:num_requests_running", "zeroc:kv_cache_usage_perc"):
        assert any(series in e for e in exprs), series


@pytest.mark.parametrize("kind", ["prefill", "decode"])
def test_tls_probe_asks_a_real_tls_service(renders, tmp_path, kind):
    """The exec probe of components/tls, run as the kubelet would, against a real service host with TLS:
    it fails while the service is NOT_SERVING (loading) and passes once it serves."""
    import decode_service.server
    import prefill_service.server
    from zeroc.config import SecurityConfig
    from zeroc.pki import make_pki
    from zeroc.rpc import ServiceHost

    module = prefill_service.server if kind == "prefill" else decode_service.server
    pki = make_pki(tmp_path)
    security = SecurityConfig(tls_ca=str(pki.ca), tls_cert=str(pki.cert), tls_key=str(pki.key))
    host = ServiceHost(ServerConfig(host="127.0.0.1", port=0), [module.SERVICE_NAME], security)
    host.start()
    c = km.container(renders[TLS_VARIANTS[0]], f"zeroc-{kind}")
    env = {**os.environ, "ZEROC_SECURITY_TLS_CA": str(pki.ca)}

    def probe(which: str) -> int:
        command = list(c[which]["exec"]["command"])
        command[0] = sys.executable  # the image's python3
        command[3] = command[3].rsplit(":", 1)[0] + f":{host.port}"
        return subprocess.run(command, env=env, capture_output=True, timeout=60).returncode

    try:
        assert probe("readinessProbe") == 1 and probe("startupProbe") == 1
        host.set_serving()
        assert probe("readinessProbe") == 0 and probe("livenessProbe") == 0
    finally:
        host.server.stop(0)
