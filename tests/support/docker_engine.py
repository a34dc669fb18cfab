"""A Docker engine of the test's own, for `make test-compose`: dockerd on a private socket with its data under
a temporary folder, a Debian base image made with debootstrap (no registry is reachable), and the image built
from the repository's Dockerfile. Everything it makes goes when the engine stops.

Debian's docker.io, docker-compose and debootstrap packages are what it runs (the Makefile installs them).
The daemon changes nothing on the host's network: no iptables rules, no docker0 bridge; the containers use
the host's network.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
BASE_IMAGE = "zeroc-base:bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"


def docker_client() -> str:
    """Debian's docker CLI, which builds with BuildKit through its own engine (a newer CLI without the buildx
    plugin cannot); any other on PATH otherwise."""
    return "/usr/bin/docker" if Path("/usr/bin/docker").exists() else (shutil.which("docker") or "docker")


def debian_mirror() -> str:
    """The machine's own Debian mirror (apt's sources), else Debian's CDN."""
    for path in [*Path("/etc/apt/sources.list.d").glob("*.sources"), Path("/etc/apt/sources.list"),
                 *Path("/etc/apt/sources.list.d").glob("*.list")]:
        text = path.read_text(errors="replace") if path.is_file() else ""
        match = re.search(r"^(?:URIs:|deb)\s+(\S+/debian)/?\s*$", text, re.M) or \
            re.search(r"^deb\s+(\S+/debian)\s+bookworm\b", text, re.M)
        if match:
            return match.group(1)
    return DEBIAN_MIRROR


def mounts_under(root: Path) -> list[str]:
    """Mount points below `root`, deepest first."""
    points = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    return sorted((p for p in points if p.startswith(f"{root}/")), key=len, reverse=True)


class DockerEngine:
    """dockerd started by this process; `run` talks to it, `close` stops it and removes its data."""

    def __init__(self, start_timeout_s: float = 60.0):
        self.root = Path(tempfile.mkdtemp(prefix="zeroc-docker-"))
        self.socket = self.root / "docker.sock"
        self.env = {**os.environ, "DOCKER_HOST": f"unix://{self.socket}", "DOCKER_BUILDKIT": "1",
                    "COMPOSE_DOCKER_CLI_BUILD": "1"}
        self.docker = docker_client()
        self.log_path = self.root / "dockerd.log"
        with self.log_path.open("wb") as out:
            self.proc = subprocess.Popen(
                ["dockerd", "--host", f"unix://{self.socket}", "--data-root", str(self.root / "data"),
                 "--exec-root", str(self.root / "exec"), "--pidfile", str(self.root / "dockerd.pid"),
                 "--iptables=false", "--ip-forward=false", "--ip-masq=false", "--bridge=none"],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + start_timeout_s
        while self.run(["info"], check=False, quiet=True).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log_tail()
                self.close()
                raise RuntimeError(f"dockerd did not start; log tail:\n{tail}")
            time.sleep(0.5)

    def run(self, args: list[str], check: bool = True, quiet: bool = False, timeout: float = 900.0,
            program: str | None = None, **kwargs) -> subprocess.CompletedProcess:
        """`docker ARGS` (or `program ARGS`) against this engine; output captured as text."""
        cmd = [program or self.docker, *args]
        if not quiet:
            log.info("$ %s", " ".join(cmd))
        result = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout, **kwargs)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {result.returncode}:\n{result.stdout[-3000:]}\n"
                               f"{result.stderr[-3000:]}")
        return result

    def import_debian_base(self, suite: str = "bookworm") -> str:
        """A minimal Debian root filesystem (debootstrap minbase) imported as BASE_IMAGE."""
        rootfs = self.root / "rootfs"
        subprocess.run(["debootstrap", "--variant=minbase", suite, str(rootfs), debian_mirror()], check=True,
                       capture_output=True, timeout=900)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        self.run(["import", "-", BASE_IMAGE], stdin=tar.stdout)
        tar.wait()
        shutil.rmtree(rootfs)
        return BASE_IMAGE

    def build(self, tag: str, target: str, build_args: dict[str, str]) -> None:
        """docker build of the repository's Dockerfile; the build reaches package registries over the host's
        network. The machine's torch wheel and CA bundle go into deploy/docker/local/ first, when it has them."""
        local = REPO / "deploy" / "docker" / "local"
        for wheel in Path("/opt/wheels").glob("torch-*+cpu-*.whl"):
            if not (local / wheel.name).exists():
                shutil.copyfile(wheel, local / wheel.name)
        ca = Path("/etc/ssl/certs/ca-certificates.crt")
        if ca.exists():
            shutil.copyfile(ca, local / "pip-ca.crt")
        args = [a for k, v in build_args.items() for a in ("--build-arg", f"{k}={v}")]
        self.run(["build", "--network", "host", "--target", target, *args, "-t", tag, str(REPO)], timeout=1800)

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def close(self) -> None:
        """Stop dockerd (it stops what still runs), then remove its data root: images, containers, volumes."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for mount in mounts_under(self.root):  # dockerd leaves exec/netns/default mounted, a killed one more
            subprocess.run(["umount", "--lazy", mount], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)
