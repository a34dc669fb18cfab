"""`zeroc stack up`: a local deployment."""

from __future__ import annotations

import argparse

from zeroc.cli import common
from zeroc.config import ZeroCConfig, ZeroCError


def cmd_stack_up(args: argparse.Namespace) -> int:
    from zeroc.stack import Stack, die_with_parent

    if args.decode < 1:
        raise ZeroCError(f"--decode must be >= 1, got {args.decode}")
    extra = [a for flag, v in (("--model", args.model), ("--dtype", args.dtype),
                                            ("--device", args.device)) if v for a in (flag, v)]
    if args.redis_url:
        ZeroCConfig.from_env(redis={"url": args.redis_url})  # a bad URL is a one-line error here
    gateway = (["--model", args.model] if args.model else []) if args.gateway else None
    die_with_parent()  # `make run` signalled: SIGTERM here too, so the services and Redis stop with it
    with Stack(args.decode, extra, redis_url=args.redis_url, gateway_args=gateway, tls=args.tls) as stack:
        print(f"kv store index:  {stack.redis_url}" + (" (embedded)" if stack.redis else ""))
        if stack.pki is not None:
            print(f"tls ca:          {stack.pki.ca} (throwaway; clients pass it to verify the services)")
        print(f"prefill service: {stack.prefill}")
        for addr in stack.decode:
            print(f"decode service:  {addr}")
        if stack.gateway:
            from zeroc.gateway.command import curl_line

            ca = stack.pki.ca if stack.pki is not None else None
            print(f"gateway:         {stack.gateway} (OpenAI API)\n"
                  f"try: {curl_line(stack.gateway, args.prompt, args.model, ca)}")
        print(f"ready; try: zeroc generate --target {stack.decode[0]} \"{args.prompt}\"", flush=True)
        return stack.wait()


def add_arguments(sub: argparse._SubParsersAction) -> None:
    """Stack up: a local deployment."""
    stack = sub.add_parser("stack", help="a local deployment").add_subparsers(dest="what", required=True)
    p = stack.add_parser("up", help="one prefill and N decode services on localhost, until Ctrl-C")
    common.model_args(p)
    p.add_argument("--decode", type=int, default=1, help="decode services to start")
    common.redis_arg(p)
    p.add_argument("--prompt", default="The built-in function", help="prompt shown in the hint")
    p.add_argument("--gateway", action="store_true", help="also run the OpenAI-compatible HTTP gateway")
    p.add_argument("--tls", action="store_true", help="TLS on every port and mTLS between the services, with a "
                   "throwaway CA and certificate made for this run (docs/security.md)")
    p.set_defaults(func=cmd_stack_up)
