"""The `zeroc` command: one module per command group, each with `add_arguments(subparsers)` registering its
commands (each command's `run` is its parser's `func`).

User errors (a missing file, a bad config, an invalid flag value) print one line
``zeroc: error: ...`` and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import sys

from zeroc.cli import bench, calibrate, eval, generate, health, serve, stack, train
from zeroc.config import ZeroCError


GROUPS = (train, calibrate, eval, bench, generate, serve, stack, health)


def build_parser(groups: tuple = GROUPS) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zeroc", description="ZeroC serving: compressed-KV LLM inference")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in groups:
        group.add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Container health checks run `zeroc health` every few seconds: it parses alone, since the full parser
    # imports torch (the bench group) and a probe must cost well under a second. `zeroc serve` parses alone
    # too: it sets libgomp's settings before torch loads (zeroc/cli/serve.py).
    if argv[:1] == ["health"]:
        parser = health.standalone_parser()
    else:
        parser = build_parser((serve,) if argv[:1] == ["serve"] else GROUPS)
    args = parser.parse_args(argv)
    args.argv = argv[2:] if argv[:2] == ["eval", "quality"] else argv
    try:
        return args.func(args)
    except ZeroCError as exc:
        print(f"zeroc: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # invalid parameter values from config dataclasses
        print(f"zeroc: error: {exc}", file=sys.stderr)
        return 2
