"""`zeroc serve gateway`: its settings (flags or `ZEROC_GATEWAY_*` variables) and the uvicorn process.

The gateway needs the model directory only for its tokenizer, chat template and context length;
the decode services hold the model.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import os
import shlex
import socket
from dataclasses import dataclass
from pathlib import Path

from zeroc.config import BUNDLED_MODEL, ConfigError, ZeroCConfig, ZeroCError

log = logging.getLogger(__name__)
LOOPS = ("auto", "asyncio", "uvloop")
# zeroc/gateway/tool_parsers.py's PARSERS (not imported: this stays light)
TOOL_PARSERS = ("hermes", "llama3_json", "mistral", "pythonic")
REASONING_PARSERS = ("deepseek_r1", "qwen3")  # zeroc/gateway/reasoning.py's, likewise
ROUTINGS = ("round_robin", "prefix")  # zeroc/gateway/replicas.py's, likewise
HTTP_IMPLEMENTATIONS = ("auto", "h11", "httptools")


@dataclass(frozen=True)
class GatewaySettings:
    """Every field has a ``ZEROC_GATEWAY_<FIELD>`` environment equivalent (targets comma-separated);
    the model directory is ``ZEROC_MODEL_DIR``, as for the services."""

    targets: tuple[str, ...] = ("127.0.0.1:50051",)  # decode services
    # how a call picks its decode service: in turn, or by its prompt's prefix (zeroc/gateway/replicas.py)
    routing: str = "round_robin"
    host: str = "127.0.0.1"
    port: int = 8000  # 0 picks a free port (printed)
    model_dir: str = str(BUNDLED_MODEL)
    timeout_s: float = 600.0  # deadline of each decode call
    max_body_mb: float = 8.0  # larger request bodies get 413
    grace_s: float = 10.0  # on SIGTERM, open requests get this long to finish
    # uvicorn's event loop and HTTP parser; "auto" takes uvloop and httptools when installed (they cut the
    # gateway's CPU per streamed token, see docs/benchmarks.md), else asyncio and h11.
    loop: str = "auto"
    http: str = "auto"
    # the served model's tool-call syntax (zeroc/gateway/tool_parsers.py), for tool_choice "auto"; "": none
    tool_call_parser: str = ""
    # the served model's thinking syntax (zeroc/gateway/reasoning.py): its <think> block as reasoning_content
    reasoning_parser: str = ""
    # the gateway's own bearer token, for its health checks where the services require one (never a caller's: each
    # call carries its caller's token, docs/security.md)
    token: str = ""
    # memory for finished Responses kept for previous_response_id (zeroc/gateway/response_store.py); 0: none kept
    responses_store_mb: float = 64.0

    def __post_init__(self) -> None:
        if not self.targets or any(":" not in t for t in self.targets):
            raise ValueError(f"targets must be HOST:PORT addresses, got {list(self.targets)}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if not self.timeout_s > 0 or not self.max_body_mb > 0 or self.grace_s < 0 or self.responses_store_mb < 0:
            raise ValueError("timeout_s and max_body_mb must be > 0, grace_s and responses_store_mb >= 0")
        if self.loop not in LOOPS:
            raise ValueError(f"loop must be one of {', '.join(LOOPS)}, got {self.loop!r}")
        if self.http not in HTTP_IMPLEMENTATIONS:
            raise ValueError(f"http must be one of {', '.join(HTTP_IMPLEMENTATIONS)}, got {self.http!r}")
        if self.tool_call_parser and self.tool_call_parser not in TOOL_PARSERS:
            raise ValueError(f"tool_call_parser must be one of {', '.join(TOOL_PARSERS)}, got "
                             f"{self.tool_call_parser!r}")
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {', '.join(ROUTINGS)}, got {self.routing!r}")
        if self.reasoning_parser and self.reasoning_parser not in REASONING_PARSERS:
            raise ValueError(f"reasoning_parser must be one of {', '.join(REASONING_PARSERS)}, got "
                             f"{self.reasoning_parser!r}")

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides) -> "GatewaySettings":
        """Defaults, then environment variables, then explicit non-None overrides."""
        env = dict(os.environ) if env is None else env
        values = {}
        for f in dataclasses.fields(cls):
            var = "ZEROC_MODEL_DIR" if f.name == "model_dir" else f"ZEROC_GATEWAY_{f.name.upper()}"
            if overrides.get(f.name) is not None:
                values[f.name] = overrides[f.name]
            elif env.get(var):
                raw = env[var]
                try:
                    values[f.name] = tuple(t.strip() for t in raw.split(",") if t.strip()) \
                        if f.name == "targets" else type(f.default)(raw)
                except ValueError:
                    raise ValueError(f"{var}={raw!r}: expected {type(f.default).__name__}") from None
        return cls(**values)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", action="append", default=None, metavar="HOST:PORT",
                   help="a decode service (repeat for several, balanced round-robin; env ZEROC_GATEWAY_TARGETS, "
                        "comma-separated; default 127.0.0.1:50051)")
    p.add_argument("--host", default=None, help="address to listen on (env ZEROC_GATEWAY_HOST; default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (env ZEROC_GATEWAY_PORT; default 8000, "
                                                          "0 picks a free one)")
    p.add_argument("--model", default=None, help="the served model's directory, for its tokenizer and chat "
                                                 "template (env ZEROC_MODEL_DIR; default: the bundled model)")
    p.add_argument("--timeout-s", type=float, default=None, help="deadline of each decode call "
                                                                "(env ZEROC_GATEWAY_TIMEOUT_S; default 600)")
    p.add_argument("--max-body-mb", type=float, default=None, help="largest request body "
                                                                  "(env ZEROC_GATEWAY_MAX_BODY_MB; default 8)")
    p.add_argument("--grace-s", type=float, default=None, help="seconds open requests get on SIGTERM "
                                                              "(env ZEROC_GATEWAY_GRACE_S; default 10)")
    p.add_argument("--loop", choices=LOOPS, default=None, help="event loop (env ZEROC_GATEWAY_LOOP; default auto: "
                                                             "uvloop when installed)")
    p.add_argument("--http", choices=HTTP_IMPLEMENTATIONS, default=None,
                   help="HTTP/1.1 implementation (env ZEROC_GATEWAY_HTTP; default auto: httptools when installed)")
    p.add_argument("--tool-call-parser", choices=TOOL_PARSERS, default=None,
                   help="the model's tool-call syntax, which tool_choice \"auto\" needs (env "
                        "ZEROC_GATEWAY_TOOL_CALL_PARSER; default: none, and \"auto\" is refused)")
    p.add_argument("--routing", choices=ROUTINGS, default=None,
                   help="how a call picks its decode service: round_robin, or prefix (requests sharing a prompt "
                        "prefix go to the replica holding its KV; env ZEROC_GATEWAY_ROUTING; default round_robin)")
    p.add_argument("--reasoning-parser", choices=REASONING_PARSERS, default=None,
                   help="the model's thinking syntax: its <think> block is returned as reasoning_content, apart "
                        "from the content (env ZEROC_GATEWAY_REASONING_PARSER; default: none)")
    p.add_argument("--responses-store-mb", type=float, default=None,
                   help="memory for finished Responses kept for previous_response_id and /v1/responses/{id} "
                        "(env ZEROC_GATEWAY_RESPONSES_STORE_MB; default 64; 0 keeps none)")


def settings_from(args: argparse.Namespace) -> GatewaySettings:
    return GatewaySettings.from_env(targets=tuple(args.target) if args.target else None, host=args.host,
                                    port=args.port, model_dir=args.model, timeout_s=args.timeout_s,
                                    max_body_mb=args.max_body_mb, grace_s=args.grace_s, loop=args.loop,
                                    http=args.http, tool_call_parser=args.tool_call_parser,
                                    reasoning_parser=args.reasoning_parser, routing=args.routing,
                                    responses_store_mb=args.responses_store_mb)


def model_card(model_dir: str | Path, tool_parser: str = "", reasoning_parser: str = ""):
    """What the gateway knows of the model: its name (the directory's, as the decode services name
    it), context length, tokenizer, chat template, tool-call and thinking syntax. Raises ConfigError."""
    from zeroc.gateway.app import ModelCard
    from zeroc.gateway.chat import load_chat_template
    from zeroc.tokenizer import Tokenizer

    path = Path(model_dir)
    cfg_path = path / "config.json"
    try:
        ctx = int(json.loads(cfg_path.read_text())["max_position_embeddings"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{cfg_path}: cannot read max_position_embeddings ({exc})") from None
    return ModelCard(path.resolve().name, ctx, Tokenizer.from_dir(path), load_chat_template(path), tool_parser,
                     reasoning_parser)


def server_stack(settings: GatewaySettings) -> tuple[str, str]:
    """The event loop and HTTP implementation to run: "auto" resolved to what is installed. ZeroCError if
    one asked for by name is not installed."""
    chosen = []
    for field, value, fast, plain in (("loop", settings.loop, "uvloop", "asyncio"),
                                      ("http", settings.http, "httptools", "h11")):
        installed = importlib.util.find_spec(fast) is not None
        if value == fast and not installed:
            raise ZeroCError(f"{field}={fast}: the {fast} package is not installed (pip install {fast})")
        chosen.append(value if value != "auto" else fast if installed else plain)
    return chosen[0], chosen[1]


def curl_line(base_url: str, prompt: str, model_dir: str | None = None, ca: str | Path | None = None) -> str:
    """A streaming completion request to try, as a shell command (`ca`: the CA file an HTTPS gateway needs)."""
    model = Path(model_dir or BUNDLED_MODEL).resolve().name
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": 32, "stream": True})
    cacert = f"--cacert {shlex.quote(str(ca))} " if ca else ""
    return (f"curl -N {cacert}{base_url}/v1/completions -H 'Content-Type: application/json' -d {shlex.quote(body)}")


def service_link(security, token: str):
    """(how the gateway reaches its decode services and whom it serves, uvicorn's TLS options) from the
    deployment's security settings (zeroc.config.SecurityConfig, the services' own): their CA to verify them, their
    token file to check callers at the edge, and HTTPS with the deployment's certificate where it has one.
    Raises ConfigError for a file it cannot read."""
    from zeroc.auth import TokenAuth
    from zeroc.gateway.app import ServiceLink

    try:
        ca = Path(security.tls_ca).read_bytes() if security.tls_ca else None
    except OSError as exc:
        raise ConfigError(f"{security.tls_ca}: cannot read the CA ({exc.strerror})") from None
    auth = TokenAuth.from_file(security.tokens_file, security.default_tenant) if security.tokens_file else None
    tls = {"ssl_certfile": security.tls_cert, "ssl_keyfile": security.tls_key} \
        if security.tls_cert and security.tls_key else {}
    return ServiceLink(ca, token, auth), tls


def run(args: argparse.Namespace) -> int:
    try:
        settings = settings_from(args)
        cfg = ZeroCConfig.from_env(metrics={"port": getattr(args, "metrics_port", None)})
    except ValueError as exc:
        raise ZeroCError(str(exc)) from None
    metrics_port = cfg.metrics.port
    link, tls = service_link(cfg.security, settings.token)
    card = model_card(settings.model_dir, settings.tool_call_parser, settings.reasoning_parser)
    loop, http = server_stack(settings)
    import uvicorn

    from zeroc.gateway.app import create_app
    from zeroc.metrics import ServiceMetrics, serve_metrics
    from zeroc.rpc import setup_logging, stop_with_parent

    setup_logging()
    if os.environ.get("ZEROC_EXIT_WITH_PARENT"):
        stop_with_parent(int(os.environ["ZEROC_EXIT_WITH_PARENT"]))
    sock = socket.socket(socket.AF_INET6 if ":" in settings.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((settings.host, settings.port))
    except OSError as exc:
        raise ZeroCError(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror}") from None
    host, port = sock.getsockname()[:2]
    metrics = ServiceMetrics()
    metrics_server = serve_metrics(metrics, settings.host, metrics_port)
    app = create_app(card, list(settings.targets), settings.timeout_s, int(settings.max_body_mb * (1 << 20)),
                     metrics, settings.routing, link, int(settings.responses_store_mb * (1 << 20)))
    config = uvicorn.Config(app, loop=loop, http=http, log_config=None, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=int(settings.grace_s), timeout_keep_alive=30, **tls)
    print(f"gateway listening on {host}:{port}", flush=True)
    log.info("serving", extra={"service": "gateway", "address": f"{host}:{port}", "model": card.name,
                               "targets": list(settings.targets), "routing": settings.routing,
                               "chat_template": card.template is not None, "https": bool(tls),
                               "tokens_required": link.auth is not None,
                               "loop": loop, "http": http})
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        if metrics_server is not None:
            metrics_server.close()
    return 0
