"""compose.yaml built and run for real (`make test-compose`; `make test` does not collect this file).

A dockerd of the test's own builds the Dockerfile's cpu target on a debootstrapped Debian base, and the stack
of compose.yaml comes up on the host's network (compose.test.yaml) on free loopback ports: Redis, a prefill
service, two decode services and the gateway. Clients: the Python SDK and curl against the OpenAI API. One
decode container is killed and the rest must serve. The last test tears everything down and checks that
nothing is left: containers, networks, volumes, images, the daemon and its data.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from docker_engine import BASE_IMAGE, REPO, DockerEngine, mounts_under

from zeroc.client import Client, ClientError, RetryPolicy
from zeroc.config import BUNDLED_MODEL
from zeroc.stack import wait_http

IMAGE = "zeroc:cpu-e2e"
PROJECT = "zeroc-e2e"
SERVICES = ("redis", "prefill", "decode-1", "decode-2", "gateway")
PROMPT = "The built-in function"
NEW_TOKENS = 12


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@dataclass
class Deployment:
    engine: DockerEngine
    compose: list[str]  # the compose command with its files and project
    ports: dict[str, int]
    torn_down: bool = False

    def compose_run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.engine.run([*self.compose[1:], *args], program=self.compose[0], check=check, cwd=REPO)

    def container(self, service: str) -> str:
        return self.compose_run("ps", "-q", service).stdout.strip()

    def inspect(self, service: str) -> dict:
        return json.loads(self.engine.run(["inspect", self.container(service)]).stdout)[0]

    def wait_healthy(self, services: tuple[str, ...], timeout_s: float = 600.0) -> None:
        deadline = time.monotonic() + timeout_s
        for service in services:
            while (state := self.inspect(service)["State"]).get("Health", {}).get("Status") != "healthy":
                if time.monotonic() > deadline or state["Status"] == "exited":
                    logs = self.compose_run("logs", "--tail", "40", service, check=False).stdout
                    raise AssertionError(f"{service} never became healthy ({state}); its log:\n{logs}")
                time.sleep(1.0)

    def teardown(self) -> None:
        if self.torn_down:
            return
        self.torn_down = True
        try:
            self.compose_run("down", "--volumes", "--remove-orphans", check=False)
            self.engine.run(["rmi", "--force", IMAGE, BASE_IMAGE], check=False)
            self.engine.run(["builder", "prune", "--all", "--force"], check=False)
        finally:
            self.engine.close()


def compose_command(engine: DockerEngine, env_file: Path, workdir: Path) -> list[str]:
    """Compose v2 (the docker CLI plugin) where the CLI has it, else Debian's docker-compose (v1), on the stack
    of compose.yaml with compose.test.yaml over it, as `config` renders the two. Published ports mean nothing on
    the host's network (and Compose v1 refuses them there), so they are dropped from the rendered file."""
    if engine.run(["compose", "version"], check=False, quiet=True).returncode == 0:
        base = [engine.docker, "compose"]
    else:
        base = [shutil.which("docker-compose") or "docker-compose"]
    base += ["--project-name", PROJECT]
    files = ["--env-file", str(env_file), "-f", str(REPO / "compose.yaml"), "-f", str(REPO / "compose.test.yaml")]
    rendered = yaml.safe_load(engine.run([*base[1:], *files, "config"], program=base[0], cwd=REPO).stdout)
    for spec in rendered["services"].values():
        spec.pop("ports", None)
    path = workdir / "compose.rendered.yaml"
    path.write_text(yaml.safe_dump(rendered, sort_keys=False))
    return [*base, "-f", str(path)]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory) -> Deployment:
    engine = DockerEngine()
    dep = None
    try:
        engine.import_debian_base()
        engine.build(IMAGE, "cpu", {"BASE_IMAGE": BASE_IMAGE})
        ports = dict(zip(("redis", "prefill", "decode-1", "decode-2", "gateway"), free_ports(5)))
        env_file = tmp_path_factory.mktemp("compose") / "e2e.env"
        env_file.write_text("".join(f"{k}={v}\n" for k, v in {
            "ZEROC_IMAGE": IMAGE, "ZEROC_SECURITY_CLUSTER_KEY": secrets.token_hex(32),
            "ZEROC_E2E_REDIS_PORT": ports["redis"], "ZEROC_E2E_PREFILL_PORT": ports["prefill"],
            "ZEROC_E2E_DECODE1_PORT": ports["decode-1"], "ZEROC_E2E_DECODE2_PORT": ports["decode-2"],
            "ZEROC_E2E_GATEWAY_PORT": ports["gateway"]}.items()))
        dep = Deployment(engine, compose_command(engine, env_file, env_file.parent), ports)
        dep.compose_run("up", "--detach")  # depends_on: each service starts once those it needs are healthy
        dep.wait_healthy(SERVICES)
        yield dep
    finally:
        if dep is not None:
            dep.teardown()
        else:
            engine.close()


def addr(dep: Deployment, service: str) -> str:
    return f"127.0.0.1:{dep.ports[service]}"


@torch.inference_mode()
def hf_greedy(ids: list[int], steps: int) -> list[int]:
    """The oracle: Hugging Face transformers' greedy continuation of `ids` with the bundled model."""
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(str(BUNDLED_MODEL), dtype=torch.float32, attn_implementation="eager")
    eos = hf.config.eos_token_id
    x = torch.tensor([ids])
    out = hf.eval().generate(x, attention_mask=torch.ones_like(x), max_new_tokens=steps, do_sample=False,
                             eos_token_id=eos, pad_token_id=eos)
    return out[0, len(ids):].tolist()


def curl_completion(dep: Deployment, prompt: str) -> str:
    """A streamed completion through the gateway's OpenAI API, by curl: the text of its SSE events."""
    body = json.dumps({"model": BUNDLED_MODEL.name, "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0,
                       "stream": True})
    out = subprocess.run(["curl", "-sS", "-N", "--fail-with-body", "--max-time", "120",
                          f"http://{addr(dep, 'gateway')}/v1/completions", "-H", "Content-Type: application/json",
                          "-d", body], capture_output=True, text=True, timeout=150)
    assert out.returncode == 0, f"curl exited {out.returncode}: {out.stdout[-500:]} {out.stderr[-500:]}"
    events = [line[len("data: "):] for line in out.stdout.splitlines() if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", out.stdout[-500:]
    return "".join(c["text"] for e in events[:-1] for c in json.loads(e)["choices"])


def test_the_image_runs_every_service_unprivileged(deployment):
    for service in SERVICES:
        info = deployment.inspect(service)
        assert info["Config"]["Entrypoint"] == (["redis-server"] if service == "redis" else ["zeroc"])
        assert info["Config"]["User"] == "zeroc"
        assert info["HostConfig"]["NetworkMode"] == "host"
        uid = deployment.compose_run("exec", "-T", service, "id", "-u").stdout.strip()
        assert uid not in ("", "0"), f"{service} runs as uid {uid!r}"
    # The bundled model came with the image into the models volume.
    listed = deployment.compose_run("exec", "-T", "prefill", "ls", "/models/zeroc-tiny").stdout.split()
    assert "model.safetensors" in listed


def test_sdk_generates_the_oracle_tokens_on_each_decode_service(deployment):
    for service in ("decode-1", "decode-2"):
        with Client(addr(deployment, service), timeout=120) as client:
            ids = client.tokenize(PROMPT)
            got = client.generate(PROMPT, max_tokens=NEW_TOKENS, ignore_eos=True)
        assert got.usage.prompt_tokens == len(ids)
        assert got.token_ids == hf_greedy(ids, NEW_TOKENS)
    # The services index their KV blocks in the stack's Redis (the real server in the redis container).
    keys = deployment.compose_run("exec", "-T", "redis", "redis-cli", "-p", str(deployment.ports["redis"]),
                                  "dbsize").stdout.strip()
    assert int(keys) > 0


def test_curl_streams_the_sdks_text_through_the_gateway(deployment):
    with Client(addr(deployment, "decode-1"), timeout=120) as client:
        want = client.generate(PROMPT, max_tokens=NEW_TOKENS).text
    assert want
    assert curl_completion(deployment, PROMPT) == want


def test_a_killed_decode_container_leaves_the_stack_serving(deployment):
    with Client(addr(deployment, "decode-2"), timeout=120) as client:
        want = client.generate(PROMPT, max_tokens=NEW_TOKENS)
    deployment.compose_run("kill", "-s", "SIGKILL", "decode-1")
    assert deployment.inspect("decode-1")["State"]["Status"] == "exited"
    with Client(addr(deployment, "decode-1"), timeout=10, retry=RetryPolicy(attempts=1)) as dead:
        with pytest.raises(ClientError):
            dead.generate(PROMPT, max_tokens=2)
    # The gateway takes its two replicas in turn: four requests meet the dead one twice and fail over.
    for _ in range(4):
        assert curl_completion(deployment, PROMPT) == want.text
    with Client(addr(deployment, "decode-2"), timeout=120) as client:
        assert client.generate(PROMPT, max_tokens=NEW_TOKENS).token_ids == want.token_ids
    wait_http(addr(deployment, "gateway"), 10.0)


def test_teardown_leaves_nothing(deployment):
    engine = deployment.engine
    deployment.compose_run("down", "--volumes", "--remove-orphans")
    engine.run(["rmi", IMAGE, BASE_IMAGE])
    engine.run(["builder", "prune", "--all", "--force"])
    assert engine.run(["ps", "--all", "--quiet"]).stdout.split() == []
    assert engine.run(["images", "--all", "--quiet"]).stdout.split() == []
    assert engine.run(["volume", "ls", "--quiet"]).stdout.split() == []
    assert set(engine.run(["network", "ls", "--format", "{{.Name}}"]).stdout.split()) <= {"host", "none"}
    deployment.teardown()
    assert engine.proc.poll() is not None  # the dockerd this test started has exited
    assert not engine.root.exists() and mounts_under(engine.root) == []
    assert processes_mentioning(str(engine.root)) == []  # no containerd, shim or container process is left


def processes_mentioning(text: str) -> list[str]:
    """Command lines of running processes that contain `text`."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # exited meanwhile
        if text in cmdline and proc.name != str(os.getpid()):
            found.append(cmdline)
    return found
