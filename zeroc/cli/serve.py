"""`zeroc serve prefill|decode|gateway`: one service process."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from zeroc.cli import common
from zeroc.config import ZeroCError


def cmd_serve(args: argparse.Namespace) -> int:
    from zeroc.rpc import setup_logging

    cfg = common.service_config(args)
    # Read by libgomp when torch loads it, which has not happened yet in this process (zeroc.cli imports no torch).
    os.environ.setdefault("GOMP_SPINCOUNT", str(cfg.threads.spin_count))
    from zeroc.cpu_threads import serial_by_default

    serial_by_default()  # before loading anything: only the engine thread runs parallel work
    if args.what == "decode" and not args.colocated and not cfg.transfer.prefill_target:
        raise ZeroCError("serve decode needs --prefill HOST:PORT (or env ZEROC_TRANSFER_PREFILL_TARGET), "
                         "or --colocated")
    if args.what == "prefill" and cfg.parallel.sp_ranks > 1 and cfg.device != "cpu":
        raise ZeroCError("--sp runs its ranks on gloo and needs --device cpu")
    if args.what == "prefill" and cfg.parallel.sp_ranks > 1 and cfg.cache.kv_policy != "none":
        raise ZeroCError("--sp computes plain attention; it does not run --kv-policy caches")
    if cfg.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ZeroCError(f"--device {cfg.device}: torch sees no CUDA device")
    if args.what == "prefill" or cfg.transfer.prefill_target:
        from zeroc.transport.landing import check_transfer

        check_transfer(cfg.cache)  # ValueError: this policy's KV cannot travel
    setup_logging()
    if os.environ.get("ZEROC_EXIT_WITH_PARENT"):
        from zeroc.rpc import stop_with_parent

        stop_with_parent(int(os.environ["ZEROC_EXIT_WITH_PARENT"]))
    if args.what == "prefill":
        from prefill_service.server import serve
    else:
        from decode_service.server import serve
    serve(cfg, ready=lambda line: print(line, flush=True))
    # Drained and closed by now. The interpreter's own teardown (a last garbage collection over torch's and
    # gRPC's objects) took ~2 s after every SIGTERM, which a supervisor restarting the service waits out.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def add_arguments(sub: argparse._SubParsersAction) -> None:
    """Serve prefill | decode."""
    serve = sub.add_parser("serve", help="run a gRPC service").add_subparsers(dest="what", required=True)
    p = serve.add_parser("prefill", help="the prefill service (streams prompt KV to decode services)")
    common.serve_args(p)
    p.add_argument("--sp", type=int, default=None, help="sequence-parallel ranks: run each prompt on this many "
                                                        "gloo processes (env ZEROC_PARALLEL_SP_RANKS; default 1)")
    p.set_defaults(func=cmd_serve)
    p = serve.add_parser("decode", help="the decode service (the entry point clients call)")
    common.serve_args(p)
    p.add_argument("--prefill", default=None, help="HOST:PORT of the prefill service")
    p.add_argument("--colocated", action="store_true", help="prefill locally; no prefill service")
    p.add_argument("--prefill-fallback", choices=["local", "fail"], default=None,
                   help="while the prefill service is unavailable: prefill locally (default) or fail the request "
                        "(env ZEROC_TRANSFER_PREFILL_FALLBACK)")
    p.set_defaults(func=cmd_serve)
    from zeroc.gateway import command as gateway

    p = serve.add_parser("gateway", help="the OpenAI-compatible HTTP API in front of decode services")
    gateway.add_arguments(p)
    common.metrics_arg(p)
    p.set_defaults(func=gateway.run)
