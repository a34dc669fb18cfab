"""Where a benchmark's services run and what the prefill -> decode link is.

`Topology` is the seam; the runner calls it, never the other way round:
- `prefix(kind)` and `bind_host(kind)` when it starts a "prefill" or "decode" service,
- `admin_address(kind, port)` to health-check that service from the benchmark process,
- `prefill_for_decode(port)` for the decode service's --prefill,
- `client_address(port)` to send requests to a decode service,
- `set_link(mbit)` before a measurement (None: unshaped), `describe()` for the report, `close()` once.

`Loopback` runs everything on 127.0.0.1 unshaped. `NetnsLink` (zeroc.bench.serve.netns) runs
prefill and decode in two network namespaces joined by a veth pair shaped with `tc ... tbf`.
`ShapedProxy` is the fallback where namespaces cannot be made: decode reaches prefill through a
TCP proxy in this process that paces the prefill -> decode bytes with a token bucket.
"""

from __future__ import annotations

import abc
import socket
import threading
import time


class Topology(abc.ABC):
    @abc.abstractmethod
    def prefix(self, kind: str) -> list[str]:
        """Command words run before `python -m zeroc.cli serve KIND ...` (e.g. `ip netns exec NS`)."""

    @abc.abstractmethod
    def bind_host(self, kind: str) -> str:
        """The --host a `kind` service listens on."""

    @abc.abstractmethod
    def admin_address(self, kind: str, port: int) -> str:
        """HOST:PORT at which this process reaches a `kind` service."""

    @abc.abstractmethod
    def prefill_for_decode(self, port: int) -> str:
        """HOST:PORT at which a decode service reaches the prefill service listening on `port`."""

    def client_address(self, port: int) -> str:
        return self.admin_address("decode", port)

    def set_link(self, mbit: float | None) -> None:
        """Limit prefill -> decode to `mbit` Mbit/s (None: unshaped)."""
        if mbit is not None:
            raise NotImplementedError(f"{type(self).__name__} cannot shape the link")

    @abc.abstractmethod
    def describe(self) -> str:
        """One line for the report."""

    def close(self) -> None:
        """Undo whatever was set up. Idempotent."""


class Loopback(Topology):
    """Every service on 127.0.0.1; no shaping."""

    def prefix(self, kind: str) -> list[str]:
        return []

    def bind_host(self, kind: str) -> str:
        return "127.0.0.1"

    def admin_address(self, kind: str, port: int) -> str:
        return f"127.0.0.1:{port}"

    def prefill_for_decode(self, port: int) -> str:
        return f"127.0.0.1:{port}"

    def describe(self) -> str:
        return "loopback, unshaped"


class TokenBucket:
    """Paces bytes to `rate` bytes/s with bursts of at most `burst` bytes; shared by all connections."""

    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = rate, burst
        self._tokens, self._last = float(burst), time.monotonic()
        self._lock = threading.Lock()

    def take(self, n: int) -> None:
        """Block until `n` (<= burst) bytes may pass."""
        while True:
            with self._lock:
                now = time.monotonic()
                self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
                self._last = now
                if self._tokens >= n:
                    self._tokens -= n
                    return
                wait = (n - self._tokens) / self.rate
            time.sleep(wait)


class ShapedProxy(Loopback):
    """Loopback, with decode -> prefill connections going through a pacing TCP proxy in this process.

    Only the prefill -> decode direction is paced (that is where KV flows); one bucket for all
    connections, as one link would be. Costs this process some CPU per byte, unlike `tc`.
    """

    CHUNK = 16 * 1024

    def __init__(self) -> None:
        self.bucket: TokenBucket | None = None
        self._listeners: list[socket.socket] = []
        self._closed = threading.Event()

    def set_link(self, mbit: float | None) -> None:
        self.bucket = None if mbit is None else TokenBucket(mbit * 1e6 / 8, self.CHUNK * 4)

    def prefill_for_decode(self, port: int) -> str:
        listener = socket.create_server(("127.0.0.1", 0))
        self._listeners.append(listener)
        threading.Thread(target=self._accept, args=(listener, port), daemon=True, name="shaper-accept").start()
        return f"127.0.0.1:{listener.getsockname()[1]}"

    def _accept(self, listener: socket.socket, port: int) -> None:
        while not self._closed.is_set():
            try:
                down, _ = listener.accept()
            except OSError:
                return
            up = socket.create_connection(("127.0.0.1", port))
            for src, dst, paced in ((down, up, False), (up, down, True)):
                threading.Thread(target=self._pump, args=(src, dst, paced), daemon=True, name="shaper").start()

    def _pump(self, src: socket.socket, dst: socket.socket, paced: bool) -> None:
        try:
            while data := src.recv(self.CHUNK):
                bucket = self.bucket
                if paced and bucket is not None:
                    bucket.take(len(data))
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):  # shutdown wakes the opposite pump, then both close
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def describe(self) -> str:
        return "loopback through an application-level token-bucket proxy (network namespaces unavailable)"

    def close(self) -> None:
        self._closed.set()
        for listener in self._listeners:
            listener.close()
        self._listeners.clear()
