"""`zeroc health HOST:PORT`: one health probe, for container health checks (compose.yaml) and scripts.

A gRPC service is asked grpc.health.v1 Check; the gateway (`--http`) is asked GET /health, which answers
200 while one of its decode services answers. Exit status 0 when healthy, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path


def probe_grpc(target: str, timeout_s: float, service: str, ca_path: str) -> str | None:
    """None when `target` reports SERVING within `timeout_s` (over TLS with `ca_path`), else why not."""
    from zeroc.rpc import wait_serving

    try:
        wait_serving(target, timeout_s, service=service, ca=Path(ca_path).read_bytes() if ca_path else None)
    except TimeoutError:
        return f"{target} did not report SERVING within {timeout_s:g}s"
    return None


def probe_http(target: str, timeout_s: float) -> str | None:
    """None when the gateway at `target` answers GET /health with 200, else why not."""
    try:
        with urllib.request.urlopen(f"http://{target}/health", timeout=timeout_s) as reply:
            return None if reply.status == 200 else f"GET /health answered {reply.status}"
    except urllib.error.HTTPError as exc:
        return f"GET /health answered {exc.code}: {exc.read(200).decode(errors='replace')}"
    except OSError as exc:  # refused, timed out (URLError is an OSError)
        return f"GET http://{target}/health failed: {exc}"


def run(args: argparse.Namespace) -> int:
    if args.timeout_s <= 0:
        raise ValueError(f"--timeout-s must be positive, got {args.timeout_s}")
    if args.http:
        problem = probe_http(args.target, args.timeout_s)
    else:
        problem = probe_grpc(args.target, args.timeout_s, args.service, args.tls_ca)
    if problem:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    print("healthy")
    return 0


def standalone_parser() -> argparse.ArgumentParser:
    """`zeroc health ...` parsed without the other command groups (and the torch they import)."""
    parser = argparse.ArgumentParser(prog="zeroc")
    add_arguments(parser.add_subparsers(dest="command", required=True))
    return parser


def add_arguments(sub: argparse._SubParsersAction) -> None:
    """Health: probe one service."""
    p = sub.add_parser("health", help="probe a service's health: exit 0 when it serves")
    p.add_argument("target", metavar="HOST:PORT", help="the service's address")
    p.add_argument("--http", action="store_true", help="an HTTP gateway: GET /health instead of grpc.health.v1")
    p.add_argument("--service", default="", help="the gRPC service name to ask about (default: the whole server)")
    p.add_argument("--timeout-s", type=float, default=3.0, help="how long to wait for a healthy answer")
    p.add_argument("--tls-ca", default=os.environ.get("ZEROC_SECURITY_TLS_CA", ""),
                   help="PEM file: the CA of a TLS service (env ZEROC_SECURITY_TLS_CA)")
    p.set_defaults(func=run)
