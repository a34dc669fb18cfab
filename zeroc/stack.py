"""A local deployment in child processes: one prefill service and N decode services on loopback.

Used by `zeroc stack up` and by the end-to-end tests; with `gateway_args` the OpenAI-compatible
HTTP gateway runs in front of the decode services too. The KV store's index comes first: an
embedded redis-server (unless ZEROC_REDIS_URL or `redis_url` names one), whose URL every service
gets, so they share one index and fetch blocks from each other. Every child is stopped (SIGTERM,
then SIGKILL) when the stack exits, whether it started cleanly or not; the embedded Redis last.
"""

from __future__ import annotations

import os
import re
import secrets
import select
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from zeroc.rpc import wait_serving

_LISTENING = re.compile(r"listening on (\S+:\d+)(?: internal (\S+:\d+))?")
# The children of one process form one deployment: unless the caller names a cluster key, they share
# this throwaway one (drawn once per parent process, never written anywhere), so they reuse each
# other's prefix blocks while no outside process can compute a block id or forge a block's MAC.
_THROWAWAY_CLUSTER_KEY = secrets.token_hex(32)


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to send `sig` to this process when its parent exits (prctl PR_SET_PDEATHSIG); a no-op
    elsewhere. With the services' own parent watch (ZEROC_EXIT_WITH_PARENT) nothing is left orphaned."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, int(sig), 0, 0, 0)


class ServiceProcess:
    """One `zeroc serve ...` child on a free port of `host`; `address` once it printed it.

    `prefix` runs it under another command, e.g. `ip netns exec NS` (which execs, keeping the pid)."""

    def __init__(self, kind: str, args: list[str], env: dict[str, str] | None = None,
                 start_timeout_s: float = 300.0, host: str = "127.0.0.1", prefix: list[str] | None = None):
        self.kind, self.args, self.env, self.host, self.prefix = kind, list(args), dict(env or {}), host, prefix
        self.log_path = Path(tempfile.mkstemp(prefix=f"zeroc-{kind}-", suffix=".log")[1])
        child_env = {**os.environ, **(env or {})}
        child_env.setdefault("OMP_NUM_THREADS", "1")
        if not child_env.get("ZEROC_SECURITY_CLUSTER_KEY") and not child_env.get("ZEROC_SECURITY_CLUSTER_KEY_FILE"):
            child_env["ZEROC_SECURITY_CLUSTER_KEY"] = _THROWAWAY_CLUSTER_KEY
        child_env["ZEROC_EXIT_WITH_PARENT"] = str(os.getpid())  # children stop if this process dies
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [*(prefix or []), sys.executable, "-m", "zeroc.cli", "serve", kind, "--host", host, "--port", "0",
                 *args],
                stdout=subprocess.PIPE, stderr=log, env=child_env)
        ca = child_env.get("ZEROC_SECURITY_TLS_CA")
        self.ca = Path(ca).read_bytes() if ca else None  # health checks over TLS when services use it
        self.internal_address = ""
        self.address = self._read_address(start_timeout_s)

    def _read_address(self, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        line = b""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if ready:
                line = self.proc.stdout.readline()
                match = _LISTENING.search(line.decode(errors="replace"))
                if match:
                    self.internal_address = match.group(2) or match.group(1)
                    return match.group(1)
            if self.proc.poll() is not None:
                break
        tail = self.log_tail()
        self.stop()
        raise RuntimeError(f"{self.kind} service did not start (exit {self.proc.returncode}); log tail:\n{tail}")

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def wait_serving(self, timeout_s: float = 300.0, address: str | None = None) -> None:
        """Block until health says SERVING, asked at `address` (default: the one it printed)."""
        try:
            wait_serving(address or self.address, timeout_s, ca=self.ca)
        except TimeoutError:
            raise RuntimeError(f"{self.kind} service never served; log tail:\n{self.log_tail()}") from None

    def log_tail(self, chars: int = 4000) -> str:
        if not self.log_path.exists():
            return "(log removed)"
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self, grace_s: float = 20.0) -> int:
        """SIGTERM, then SIGKILL after `grace_s`; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()
        self.log_path.unlink(missing_ok=True)
        return self.proc.returncode


def wait_http(address: str, timeout_s: float, ca: str | None = None) -> None:
    """Block until the gateway at `address` answers GET /v1/models (200, or 401 where it wants a token): over HTTPS
    verified by the CA file `ca` where given. TimeoutError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    context = ssl.create_default_context(cafile=ca) if ca else None
    while True:
        try:
            url = f"{'https' if ca else 'http'}://{address}/v1/models"
            with urllib.request.urlopen(url, timeout=2.0, context=context) as reply:
                if reply.status == 200:
                    return
        except urllib.error.HTTPError as exc:
            if exc.code == 401:
                return
        except OSError:
            pass  # not listening yet (URLError is an OSError)
        if time.monotonic() > deadline:
            raise TimeoutError(f"http://{address} did not answer within {timeout_s:.0f}s")
        time.sleep(0.1)


class Stack:
    """One prefill service plus `num_decode` decode services pointed at it."""

    def __init__(self, num_decode: int, extra_args: list[str] | None = None, env: dict[str, str] | None = None,
                 redis_url: str | None = None, gateway_args: list[str] | None = None, tls: bool = False):
        self.num_decode, self.extra, self.env = num_decode, list(extra_args or []), dict(env or {})
        self.gateway_args = gateway_args  # None: no gateway
        self.tls = tls
        self.pki = None  # with `tls`: the throwaway CA and certificate (zeroc.pki), removed at close
        self._pki_dir: tempfile.TemporaryDirectory | None = None
        self.redis_url = redis_url or self.env.get("ZEROC_REDIS_URL") or os.environ.get("ZEROC_REDIS_URL")
        self.redis = None  # the embedded server, when this stack runs one
        self.services: list[ServiceProcess] = []
        self._stop = threading.Event()

    def __enter__(self) -> "Stack":
        try:
            if self.tls:
                from zeroc.pki import make_pki

                self._pki_dir = tempfile.TemporaryDirectory(prefix="zeroc-pki-")
                self.pki = make_pki(Path(self._pki_dir.name))
                self.env.update(self.pki.env())
            if not self.redis_url:
                from kv_store.embedded import EmbeddedRedis

                self.redis = EmbeddedRedis().start()
                self.redis_url = self.redis.url
            self.env["ZEROC_REDIS_URL"] = self.redis_url
            prefill = self._start("prefill", [])
            prefill.wait_serving()
            decodes = [self._start("decode", ["--prefill", prefill.internal_address]) for _ in range(self.num_decode)]
            for d in decodes:
                d.wait_serving()
            if self.gateway_args is not None:
                targets = [a for d in decodes for a in ("--target", d.address)]
                gateway = ServiceProcess("gateway", [*self.gateway_args, *targets], self.env)
                self.services.append(gateway)
                wait_http(gateway.address, 60.0, self.env.get("ZEROC_SECURITY_TLS_CA"))
        except BaseException:
            self.close()
            raise
        return self

    def _start(self, kind: str, args: list[str]) -> ServiceProcess:
        svc = ServiceProcess(kind, [*self.extra, *args], self.env)
        self.services.append(svc)
        return svc

    @property
    def prefill(self) -> str:
        return self.services[0].address

    @property
    def decode(self) -> list[str]:
        return [s.address for s in self.services if s.kind == "decode"]

    @property
    def gateway(self) -> str | None:
        """The gateway's base URL, e.g. http://127.0.0.1:8000 (https with TLS; None without one)."""
        scheme = "https" if self.env.get("ZEROC_SECURITY_TLS_CERT") else "http"
        return next((f"{scheme}://{s.address}" for s in self.services if s.kind == "gateway"), None)

    def wait(self, max_restarts: int = 5) -> int:
        """Supervise the services until SIGINT/SIGTERM (then 0): a child that dies is restarted on its
        ports after a backoff (0.1 s doubling to 8 s); after `max_restarts` restarts of one service in
        a row (it never stayed up a minute) the stack gives up and returns 1. Children are looked at
        every 0.1 s: a restart's cost is the service's own start, not the supervisor's polling."""
        if threading.current_thread() is threading.main_thread():  # else the caller stops it: `stop()`
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self._stop.set())
        restarts = [0] * len(self.services)
        started = [time.monotonic()] * len(self.services)
        while not self._stop.wait(0.1):
            for i, svc in enumerate(self.services):
                if svc.proc.poll() is None:
                    if time.monotonic() - started[i] > 60:
                        restarts[i] = 0
                    continue
                if restarts[i] >= max_restarts:
                    print(f"{svc.kind} service keeps exiting ({svc.proc.returncode}); giving up", file=sys.stderr)
                    return 1
                print(f"{svc.kind} service exited ({svc.proc.returncode}); restarting on {svc.address}",
                      file=sys.stderr, flush=True)
                if self._stop.wait(min(0.1 * 2 ** restarts[i], 8.0)):
                    return 0
                restarts[i] += 1
                started[i] = time.monotonic()
                try:
                    self.services[i] = self._restart(svc)
                except RuntimeError as exc:  # it did not come up: counted, tried again next round
                    print(f"{svc.kind} service restart failed: {str(exc)[:200]}", file=sys.stderr)
        return 0

    def stop(self) -> None:
        """Make `wait` return (as SIGTERM does)."""
        self._stop.set()

    def _restart(self, svc: ServiceProcess) -> ServiceProcess:
        """A new process like `svc`, on its public (and internal) port, so peers and clients find it again."""
        env = dict(svc.env)
        if svc.internal_address and svc.internal_address != svc.address:
            env["ZEROC_SECURITY_INTERNAL_PORT"] = svc.internal_address.rsplit(":", 1)[1]
        svc.stop()
        return ServiceProcess(svc.kind, [*svc.args, "--port", str(svc.port)], env, host=svc.host, prefix=svc.prefix)

    def close(self) -> None:
        for svc in reversed(self.services):
            svc.stop()
        if self.redis is not None:
            self.redis.close()
        if self._pki_dir is not None:
            self._pki_dir.cleanup()

    def __exit__(self, *exc) -> None:
        self.close()
