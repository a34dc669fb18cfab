"""`zeroc generate`: local generation, or a request to a decode service."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from zeroc.cli import common
from zeroc.config import ZeroCError


def _guide(args: argparse.Namespace) -> dict | None:
    """The structured-output option given, as the SDK's guide dict (zeroc.client.build_request); "@PATH" reads a
    schema or grammar from a file."""
    guide = _guide_kind(args)
    if args.guide_after and guide is None:
        raise ZeroCError("--guide-after: give a guide too (--json-object, --json-schema, --regex, --choice, "
                         "--grammar)")
    return guide if not args.guide_after else {**guide, "after": args.guide_after}


def _guide_kind(args: argparse.Namespace) -> dict | None:
    for kind in ("json_schema", "regex", "grammar"):
        text = getattr(args, kind)
        if text is not None and text.startswith("@") and kind != "regex":
            path = Path(text[1:])
            if not path.is_file():
                raise ZeroCError(f"{path}: file not found")
            return {kind: path.read_text()}
        if text is not None:
            return {kind: text}
    if args.choice:
        return {"choice": args.choice}
    return {"json_object": True} if args.json_object else None


def _local_guide(guide: dict | None):
    """The SDK's guide dict as the engine's `Guide`."""
    from zeroc.sampling import Guide

    if guide is None:
        return None
    after = guide.get("after", "")
    (kind, value), = ((k, v) for k, v in guide.items() if k != "after")
    if kind == "json_object":
        return Guide("json", after=after)
    return Guide("choice", choices=tuple(value), after=after) if kind == "choice" else Guide(kind, value, after=after)


def _sampling(args: argparse.Namespace) -> dict:
    """The sampling options both ways take under the same names (`SamplingParams`, `Client.stream`), but the guide
    (each way's own type)."""
    return {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "min_p": args.min_p,
            "seed": args.seed, "min_tokens": args.min_tokens,
            "stop": tuple(args.stop or ()), "logprobs": args.logprobs, "frequency_penalty": args.frequency_penalty,
            "presence_penalty": args.presence_penalty, "repetition_penalty": args.repetition_penalty,
            "prompt_logprobs": args.prompt_logprobs}


def _logprobs_json(logprobs) -> list[dict]:
    return [{"logprob": lp.logprob, "top": [list(t) for t in lp.top]} for lp in logprobs]


def _extra(args: argparse.Namespace, logprobs: list, prompt_logprobs: list) -> dict:
    """The --json output's log-probabilities, where asked for."""
    out = {"logprobs": _logprobs_json(logprobs)} if args.logprobs is not None else {}
    if args.prompt_logprobs is not None:
        out["prompt_logprobs"] = _logprobs_json(prompt_logprobs)
    return out


def cmd_generate(args: argparse.Namespace) -> int:
    if args.target:
        return _generate_remote(args)
    from zeroc.engine import Engine
    from zeroc.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=args.max_tokens, guide=_local_guide(_guide(args)), **_sampling(args))
    loaded, cfg = common.load(args, common.cache_settings(args))
    engine = Engine(loaded, cfg.cache, cfg.scheduler, release_weights=True)  # as a service does
    request_id = engine.add_request(args.prompt, params, priority=args.priority)
    tokens: list[int] = []
    logprobs: list = []
    prompt_logprobs: list = []
    text, reason = "", None
    if not args.json:
        print(args.prompt, end="", flush=True)
    while engine.has_unfinished():
        for out in engine.step():
            tokens += out.token_ids
            logprobs += out.logprobs
            prompt_logprobs += out.prompt_logprobs or []
            text += out.text_delta
            reason = out.finish_reason if out.finished else reason
            if not args.json:
                print(out.text_delta, end="", flush=True)
    if args.json:
        print(json.dumps({"request_id": request_id, "text": text, "token_ids": tokens, "finish_reason": reason,
                          **_extra(args, logprobs, prompt_logprobs)}))
    else:
        print(f"\n[finish_reason={reason}, {len(tokens)} tokens]")
    return 0


def _generate_remote(args: argparse.Namespace) -> int:
    from zeroc.client import Chunk, Client, ClientError

    out: list = []
    try:
        ca = Path(args.ca).read_bytes() if args.ca else None
        token = args.token or os.environ.get("ZEROC_TOKEN") or None
        with Client(args.target, timeout=args.timeout, token=token, ca=ca) as client:
            if not args.json:
                print(args.prompt, end="", flush=True)
            for item in client.stream(args.prompt, max_tokens=args.max_tokens, guide=_guide(args),
                                      priority=args.priority, **_sampling(args)):
                out.append(item)
                if isinstance(item, Chunk) and not args.json:
                    print(item.text, end="", flush=True)
    except ClientError as exc:
        raise ZeroCError(f"{args.target}: {exc}") from None
    chunks, result = [c for c in out if isinstance(c, Chunk)], out[-1]
    tokens = [t for c in chunks for t in c.token_ids]
    if args.json:
        extra = _extra(args, [lp for c in chunks for lp in c.logprobs],
                       [lp for c in chunks for lp in c.prompt_logprobs])
        print(json.dumps({"request_id": result.request_id, "text": "".join(c.text for c in chunks),
                          "token_ids": tokens, "finish_reason": result.finish_reason,
                          "usage": vars(result.usage), **extra}))
    else:
        print(f"\n[finish_reason={result.finish_reason}, {len(tokens)} tokens, "
              f"ttft {result.usage.ttft_ms:.1f} ms]")
    return 0


def add_arguments(sub: argparse._SubParsersAction) -> None:
    """Generate: one completion, local or remote."""
    p = sub.add_parser("generate", help="complete a prompt with a local model")
    common.model_args(p)
    p.add_argument("prompt")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-tokens", type=int, default=0, help="tokens before a stop token or string may end it")
    p.add_argument("--priority", type=int, default=0,
                   help="scheduling priority, lower first (a decode service with --scheduling-policy priority)")
    p.add_argument("--min-p", type=float, default=0.0, help="keep tokens at least this times the most likely one's "
                                                            "probability, in [0, 1]; 0: no cut")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--logprobs", type=int, default=None,
                   help="with --json: each token's log-probability and those of the N most likely tokens (0-20)")
    p.add_argument("--prompt-logprobs", type=int, default=None,
                   help="with --json: each prompt token's log-probability from the second on, and those of the N "
                        "most likely tokens (0-20)")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI's, in [-2, 2]")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI's, in [-2, 2]")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="in (0, 10]; 1: none")
    guide = p.add_mutually_exclusive_group()  # structured output (zeroc/structured.py)
    guide.add_argument("--json-object", action="store_true", help="the output is a JSON object")
    guide.add_argument("--json-schema", default=None, help="the output is an instance of this JSON Schema (@FILE: "
                                                           "read it from FILE)")
    guide.add_argument("--regex", default=None, help="the output matches this regular expression")
    guide.add_argument("--choice", action="append", help="the output is one of these strings (repeatable)")
    guide.add_argument("--grammar", default=None, help="the output matches this GBNF grammar's root (@FILE)")
    p.add_argument("--guide-after", default="", metavar="TOKEN", help="the guide applies after this token (one of "
                                                                      "the vocabulary: a reasoning model's </think>)")
    p.add_argument("--block-size", type=int, default=None, help="KV cache block size (env ZEROC_CACHE_BLOCK_SIZE)")
    common.kv_policy_args(p)
    p.add_argument("--target", default=None, help="HOST:PORT of a decode service (default: run locally)")
    p.add_argument("--ca", default=None, help="with --target: PEM of the CA that signed the service (TLS)")
    p.add_argument("--token", default=None, help="with --target: bearer token (env ZEROC_TOKEN)")
    p.add_argument("--timeout", type=float, default=300.0, help="deadline in seconds with --target")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_generate)
