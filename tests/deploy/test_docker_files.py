"""The Dockerfile and compose files, checked statically (no engine): the CUDA target cannot be built here, and
`make test-compose` (tests/deploy/compose_e2e.py) runs the CPU image and the stack for real.

The compose files must agree with the code: every ZEROC_* variable they set is one the services or the gateway
read, the addresses services are given point at the ports their peers listen on, and every health check asks
the service's own port.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path

import pytest
import yaml

from zeroc.config import ZeroCConfig
from zeroc.gateway.command import GatewaySettings

REPO = Path(__file__).resolve().parents[2]
ZEROC_SERVICES = ("prefill", "decode-1", "decode-2", "gateway")


def stages() -> dict[str, dict]:
    """Dockerfile stage name -> {"from": image, "lines": [instruction lines]}; plus "": the global ARGs."""
    text = re.sub(r"\\\n\s*", " ", (REPO / "Dockerfile").read_text())  # join continued lines
    out: dict[str, dict] = {"": {"from": None, "lines": []}}
    current = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"FROM\s+(\S+)\s+AS\s+(\S+)", line, re.I)
        if match:
            current = match.group(2)
            out[current] = {"from": match.group(1), "lines": []}
        else:
            out[current]["lines"].append(line)
    return out


def instruction(stage: dict, name: str) -> list[str]:
    return [line.split(None, 1)[1] for line in stage["lines"] if line.split()[0].upper() == name]


def global_args() -> dict[str, str]:
    return dict(arg.split("=", 1) for arg in instruction(stages()[""], "ARG"))


def test_dockerfile_has_a_cpu_and_a_cuda_target_on_base_images_named_by_build_args():
    all_stages = stages()
    assert list(all_stages)[1:] == ["src", "cuda-build", "cuda", "cpu-build", "cpu"]  # cpu last: the default target
    args = global_args()
    assert args["BASE_IMAGE"] == "python:3.11-slim"
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-(cudnn-)?runtime-ubuntu[\d.]+", args["CUDA_BASE_IMAGE"])
    assert all_stages["cpu-build"]["from"] == all_stages["cpu"]["from"] == "${BASE_IMAGE}"
    assert all_stages["cuda-build"]["from"] == all_stages["cuda"]["from"] == "${CUDA_BASE_IMAGE}"


@pytest.mark.parametrize("target", ["cpu", "cuda"])
def test_runtime_stage_runs_zeroc_unprivileged_with_the_bundled_model(target):
    stage = stages()[target]
    assert instruction(stage, "USER") == ["zeroc"]
    assert instruction(stage, "ENTRYPOINT") == ['["zeroc"]']
    copies = instruction(stage, "COPY")
    assert f"--from={target}-build /opt/zeroc /opt/zeroc" in copies  # the venv built in its own stage
    assert "--chown=zeroc:zeroc models /models" in copies
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(instruction(stage, "ENV"))))
    assert env["ZEROC_MODEL_DIR"] == "/models/zeroc-tiny" and (REPO / "models" / "zeroc-tiny").is_dir()
    assert env["PATH"].startswith("/opt/zeroc/bin:")
    assert env["ZEROC_DEVICE"] == target
    # The user the services run as is made unprivileged (a fixed uid other than 0).
    setup = (REPO / "deploy" / "docker" / "setup.sh").read_text()
    uid = re.search(r"useradd --uid (\d+) .* zeroc$", setup, re.M)
    assert uid and int(uid.group(1)) >= 1000


def test_build_stages_install_what_their_target_needs():
    for name in ("cpu-build", "cuda-build"):  # one torch and one project install, each for its own target
        runs = [r for r in instruction(stages()[name], "RUN") if "zeroc-setup torch" in r or "zeroc-setup project" in r]
        assert [r.split()[-2:] for r in runs] == [["torch", name[:-6]], ["project", name[:-6]]]
    cpu = " ".join(stages()["cpu-build"]["lines"])
    cuda = " ".join(stages()["cuda-build"]["lines"])
    assert "zeroc-setup torch cpu" in cpu and "TORCH_INDEX_URL=${TORCH_INDEX_URL}" in cpu
    assert "zeroc-setup torch cuda" in cuda and "TORCH_INDEX_URL" not in cuda
    assert "zeroc-setup project cpu" in cpu and "zeroc-setup project cuda" in cuda
    setup = (REPO / "deploy" / "docker" / "setup.sh").read_text()
    assert '"/src$extras"' in setup and 'extras="[gpu]"' in setup  # the cuda image gets the gpu extra
    # Every package the project installs from is copied into both build stages.
    packages = {"zeroc", "kernels", "prefill_service", "decode_service", "kv_store"}
    copied = {c.split()[0] for c in instruction(stages()["src"], "COPY")}
    assert packages <= copied
    for name in ("cpu-build", "cuda-build"):
        assert "--from=src /src /src" in instruction(stages()[name], "COPY")
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {f"!{p}" for p in packages | {"models", "deploy/docker"}} <= set(ignored)


def compose(*files: str) -> dict:
    """The services of compose files merged as compose does it for these keys (later files win per key)."""
    merged: dict[str, dict] = {}
    for name in files:
        for service, spec in yaml.safe_load((REPO / name).read_text())["services"].items():
            into = merged.setdefault(service, {})
            for key, value in spec.items():
                if isinstance(value, dict) and isinstance(into.get(key), dict):
                    into[key] = {**into[key], **value}
                else:
                    into[key] = value
    return merged


def interpolate(value: object, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error} with `env`."""
    def sub(m: re.Match) -> str:
        name, op, default = m.group(1), m.group(2) or "", m.group(3) or ""
        return env.get(name) or (default if op == ":-" else "")
    return re.sub(r"\$\{(\w+)(:[-?])?([^}]*)\}", sub, str(value))


def known_variables() -> set[str]:
    """Every ZEROC_* variable `ZeroCConfig.from_env` and `GatewaySettings.from_env` read."""
    names = set()
    for f in dataclasses.fields(ZeroCConfig):
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            names |= {f"ZEROC_{f.name}_{g.name}".upper() for g in dataclasses.fields(f.default_factory)}
        else:
            names.add(f"ZEROC_{f.name}".upper())
    return names | {f"ZEROC_GATEWAY_{f.name}".upper() for f in dataclasses.fields(GatewaySettings)}


@pytest.mark.parametrize("files", [("compose.yaml",), ("compose.yaml", "compose.test.yaml")])
def test_compose_services_agree_with_the_code(files):
    services = compose(*files)
    env = {"ZEROC_SECURITY_CLUSTER_KEY": "k" * 64}
    known = known_variables()
    listen = {}  # service -> the port it listens on
    for name in ZEROC_SERVICES:
        spec = services[name]
        variables = {k: interpolate(v, env) for k, v in spec["environment"].items()}
        assert {k for k in variables if k.startswith("ZEROC_")} <= known
        if name == "gateway":
            settings = GatewaySettings.from_env(variables)
            listen[name] = settings.port
            targets = settings.targets
        else:
            cfg = ZeroCConfig.from_env(variables)  # the service's configuration: a bad value raises here
            listen[name] = cfg.server.port
            assert cfg.store.advertise.endswith(f":{cfg.server.port}")
            assert cfg.redis.url.endswith(f":{interpolate(services['redis']['command'][1], env)}/0")
            if name.startswith("decode"):
                assert cfg.transfer.prefill_target.endswith(f":{listen['prefill']}")
        assert spec["command"][:2] == ["serve", name.split("-")[0]]
        # The health check asks the service's own port, through the image's `zeroc health`.
        check = spec["healthcheck"]["test"]
        assert check[0] == "CMD-SHELL" and shlex.split(check[1])[:2] == ["zeroc", "health"]
        port_var = "ZEROC_GATEWAY_PORT" if name == "gateway" else "ZEROC_SERVER_PORT"
        assert check[1].endswith(f"127.0.0.1:$${{{port_var}}}") and ("--http" in check[1]) == (name == "gateway")
        assert all(d["condition"] == "service_healthy" for d in spec["depends_on"].values())
    assert sorted(int(t.rsplit(":", 1)[1]) for t in targets) == sorted([listen["decode-1"], listen["decode-2"]])
    assert "redis-cli" in services["redis"]["healthcheck"]["test"][1]
    assert set(services["gateway"]["depends_on"]) == {"decode-1", "decode-2"}


def test_compose_mounts_a_models_volume_and_the_test_file_stays_on_loopback():
    base = yaml.safe_load((REPO / "compose.yaml").read_text())
    assert "models" in base["volumes"]
    for name in ZEROC_SERVICES:
        assert "models:/models" in base["services"][name]["volumes"]
        assert all(p.startswith("127.0.0.1:") for p in base["services"][name].get("ports", []))
    test = compose("compose.yaml", "compose.test.yaml")
    for name, spec in test.items():
        assert spec["network_mode"] == "host"
        host = spec["environment"].get("ZEROC_GATEWAY_HOST" if name == "gateway" else "ZEROC_SERVER_HOST") \
            if name != "redis" else spec["command"][spec["command"].index("--bind") + 1]
        assert host == "127.0.0.1"
