"""What every ZeroC gRPC service shares: server options, health + reflection, JSON logs, SIGTERM."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from concurrent import futures
from typing import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from zeroc.config import SecurityConfig, ServerConfig
from zeroc.tls import Tls, add_port, is_loopback, open_channel

log = logging.getLogger(__name__)

# Protocol limits on caller-chosen strings (they are echoed in responses and logs).
MAX_REQUEST_ID_CHARS = 256
MAX_MODEL_CHARS = 256
# Initial-metadata header naming the replica process that accepted a Generate call (an opaque id drawn per
# process): clients can tell which replica ran a call, and a restarted replica from its former self.
REPLICA_HEADER = "zeroc-replica"
QUOTE_CHARS = 64  # error messages quote at most this much of any input


def quote(value: object, limit: int = QUOTE_CHARS) -> str:
    """`repr` of `value` cut to its first `limit` characters: error messages never echo unbounded input."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def check_id(name: str, value: str, context: grpc.ServicerContext, limit: int = MAX_REQUEST_ID_CHARS) -> None:
    """INVALID_ARGUMENT unless the caller-chosen string `value` (field `name`) is at most `limit` characters."""
    if len(value) > limit:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{name} has {len(value)} characters; at most {limit} "
                                                        "are allowed")


class _Undecodable:
    """What a request that protobuf could not parse (bad wire bytes, invalid UTF-8) turns into."""

    def __init__(self, error: Exception):
        self.error = error


def _lenient(deserializer: Callable[[bytes], object]) -> Callable[[bytes], object]:
    def parse(raw: bytes) -> object:
        try:
            return deserializer(raw)
        except Exception as exc:  # DecodeError and friends: the caller's bytes, not a server fault
            return _Undecodable(exc)
    return parse


def _guarded(behavior: Callable, streaming: bool) -> Callable:
    """The behavior, answering INVALID_ARGUMENT to an undecodable request (gRPC itself would say INTERNAL)."""
    def reject(request: _Undecodable, context: grpc.ServicerContext) -> None:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                      f"the request could not be parsed: {quote(request.error, 200)}")

    if streaming:
        def run_stream(request, context):
            if isinstance(request, _Undecodable):
                reject(request, context)
            yield from behavior(request, context)
        return run_stream

    def run(request, context):
        if isinstance(request, _Undecodable):
            reject(request, context)
        return behavior(request, context)
    return run


def add_servicer(add_to_server: Callable, servicer: object, server: grpc.Server,
                 replace: Callable[[str, grpc.RpcMethodHandler], grpc.RpcMethodHandler] | None = None) -> None:
    """Register `servicer` as the generated `add_..._to_server` does, except that a request protobuf cannot
    parse gets INVALID_ARGUMENT instead of gRPC's INTERNAL "Exception deserializing request!".
    `replace(method, handler)` may swap parts of a handler (e.g. a response serializer)."""

    class _Collect:
        def add_generic_rpc_handlers(self, generic) -> None:
            self.generic = generic

        def add_registered_method_handlers(self, name: str, handlers: dict) -> None:
            self.name, self.handlers = name, dict(handlers)

    collected = _Collect()
    add_to_server(servicer, collected)
    if not hasattr(collected, "handlers"):  # an older generated helper: no per-method registration
        raise RuntimeError("the generated gRPC code is too old for add_servicer; regenerate the stubs")
    handlers = {}
    for method, h in collected.handlers.items():
        if h.request_deserializer is not None and not h.request_streaming:
            behavior = h.unary_stream if h.response_streaming else h.unary_unary
            guarded = _guarded(behavior, h.response_streaming)
            h = h._replace(request_deserializer=_lenient(h.request_deserializer),
                           **{"unary_stream" if h.response_streaming else "unary_unary": guarded})
        handlers[method] = replace(method, h) if replace else h
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(collected.name, handlers),))
    server.add_registered_method_handlers(collected.name, handlers)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any `extra=` fields."""

    _plain = set(vars(logging.LogRecord("", 0, "", 0, "", (), None)))

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 3), "level": record.levelname, "logger": record.name,
               "msg": record.getMessage()}
        out.update({k: v for k, v in vars(record).items() if k not in self._plain and k != "message"})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: int = logging.INFO) -> None:
    """Structured logs on stderr for a service process."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def channel_options(cfg: ServerConfig) -> list[tuple[str, int]]:
    limit = cfg.max_message_mb << 20
    return [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        ("grpc.keepalive_time_ms", int(cfg.keepalive_s * 1000)),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ]


class ServiceHost:
    """A gRPC server with health (NOT_SERVING until `set_serving`) and reflection.

    Health goes SERVING only once the caller has loaded its model, so balancers and the SDK
    never route to a process that cannot answer yet.
    """

    def __init__(self, cfg: ServerConfig, service_names: list[str], security: SecurityConfig | None = None):
        self.cfg = cfg
        security = security or SecurityConfig()
        self.tls = Tls.from_config(security)
        self.service_names = list(service_names)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=cfg.workers),
                                  options=channel_options(cfg), maximum_concurrent_rpcs=cfg.workers)
        self.health = health.HealthServicer()
        add_servicer(health_pb2_grpc.add_HealthServicer_to_server, self.health, self.server)
        reflection.enable_server_reflection(
            [*self.service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME], self.server)
        self._set(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = add_port(self.server, f"{cfg.host}:{cfg.port}", self.tls, False, security.allow_plaintext)
        if not self.port:
            raise OSError(f"cannot listen on {cfg.host}:{cfg.port}")
        # With TLS, internal RPCs come in on a second, mTLS port (zeroc/tls.py); without, on the one port.
        self.internal_port = self.port
        if self.tls is not None:
            self.internal_port = add_port(self.server, f"{cfg.host}:{security.internal_port}", self.tls, True)
            if not self.internal_port:
                raise OSError(f"cannot listen on {cfg.host}:{security.internal_port}")
        self._stop = threading.Event()
        self.draining = threading.Event()  # set on SIGTERM: servicers refuse new work from then on

    @property
    def address(self) -> str:
        return f"{self.cfg.host}:{self.port}"

    @property
    def internal_address(self) -> str:
        """Where other services call this one's internal RPCs (peer fetch, Prefill)."""
        return f"{self.cfg.host}:{self.internal_port}"

    @property
    def listening(self) -> str:
        """The line a service prints once it listens (zeroc.stack reads the addresses from it)."""
        extra = f" internal {self.internal_address}" if self.internal_port != self.port else ""
        return f"listening on {self.address}{extra}"

    def _set(self, status: int) -> None:
        for name in ("", *self.service_names):
            self.health.set(name, status)

    def start(self) -> None:
        self.server.start()

    def set_serving(self) -> None:
        self._set(health_pb2.HealthCheckResponse.SERVING)
        if self.tls is None:
            where = "on loopback" if is_loopback(self.cfg.host) else "OFF LOOPBACK (allow_plaintext=any)"
            log.warning(f"plaintext gRPC (no TLS) {where}", extra={"address": self.address})

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stop.set())

    def wait_and_drain(self, on_stopped: Callable[[], None], busy: Callable[[], bool] = lambda: False) -> None:
        """Block until SIGTERM/SIGINT (or `request_stop`), then drain.

        Health turns NOT_SERVING and servicers refuse new calls with UNAVAILABLE (they check
        `draining`) while in-flight calls (`busy()`) get up to `grace_s` to finish; then the
        server stops, cancelling what is left (their callbacks free their resources), and
        `on_stopped` shuts the component's own workers down.
        """
        while not self._stop.wait(0.5):
            pass
        log.info("shutting down", extra={"grace_s": self.cfg.grace_s})
        self.draining.set()
        self._set(health_pb2.HealthCheckResponse.NOT_SERVING)
        deadline = time.monotonic() + self.cfg.grace_s
        while busy() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.server.stop(max(0.0, deadline - time.monotonic())).wait()
        on_stopped()
        log.info("stopped")

    def request_stop(self) -> None:
        self._stop.set()


def stop_with_parent(parent_pid: int) -> None:
    """SIGTERM this process (a graceful drain) once `parent_pid` is no longer its parent.

    Set up by `zeroc stack` and the tests' service fixtures (env ZEROC_EXIT_WITH_PARENT) so a
    killed parent never leaves services running on its ports.
    """
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


class CallCounter:
    """Calls in progress, for draining: `enter` when a call starts; it leaves when the call ends."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._n = 0

    def enter(self, context: grpc.ServicerContext) -> None:
        with self._lock:
            self._n += 1
        context.add_callback(self._leave)

    def _leave(self) -> None:
        with self._lock:
            self._n -= 1

    def busy(self) -> bool:
        return self.count() > 0

    def count(self) -> int:
        with self._lock:
            return self._n


def wait_serving(target: str, timeout_s: float, service: str = "", ca: bytes | None = None) -> None:
    """Block until `target`'s health check says SERVING (over TLS when `ca` is given); raise TimeoutError
    after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    with open_channel(target, ca=ca) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise TimeoutError(f"{target} did not report SERVING within {timeout_s:.0f}s")
            time.sleep(0.1)
