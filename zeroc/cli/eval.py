"""`zeroc eval ppl|quality|longctx`: perplexity, the quality table of ZeroC against the KV-policy baselines, and
long-context retrieval accuracy per KV method and budget."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from zeroc.cli import common
from zeroc.config import BUNDLED_CALIB, BUNDLED_HELDOUT, ZeroCError
from zeroc.policies import NONE, POLICY_NAMES


def cmd_eval_ppl(args: argparse.Namespace) -> int:
    from zeroc.eval.perplexity import perplexity_full, perplexity_streaming
    from zeroc.data import read_eval_tokens
    from zeroc.policies import cache_config, method_at_budget

    if args.kv_policy != NONE and not args.streaming:
        raise ZeroCError("--kv-policy needs --streaming (policies decide what a token-by-token cache keeps)")
    if args.kv_policy == NONE and args.kv_budget != 1.0:
        raise ZeroCError("--kv-budget needs a --kv-policy")
    loaded, _ = common.load(args)
    tokens = read_eval_tokens(loaded.tokenizer, args.data, args.max_tokens)
    show = not args.json
    if args.kv_policy != NONE:  # the serving cache and store, at the hyperparameters that hold the budget
        method = method_at_budget(args.kv_policy, args.kv_budget, loaded.config, args.ctx)  # ValueError: one line
        res = perplexity_streaming(loaded.model, tokens, args.ctx, args.batch_size, progress=show,
                                   cache=cache_config(method))
        if args.json:
            print(json.dumps({**res.to_dict(), "budget": args.kv_budget, "label": method.label}))
        else:
            print(f"perplexity {res.perplexity:.4f} (streaming, {method.label} at budget {args.kv_budget}: KV held "
                  f"{res.kv_fraction_mean:.3f} of fp16 on average; {res.tokens} tokens, {res.windows} windows "
                  f"of {res.ctx})")
        return 0
    if args.streaming:
        result = perplexity_streaming(loaded.model, tokens, args.ctx, args.batch_size, progress=show)
    else:
        result = perplexity_full(loaded.model, tokens, args.ctx, progress=show)
    from zeroc.tier import tier_kv_fraction

    kv = tier_kv_fraction(loaded.config, args.ctx)  # a token tier's full-rank rows included
    if args.json:
        print(json.dumps({**result.to_dict(), "kv_fraction": kv}))
    else:
        print(f"perplexity {result.perplexity:.4f} ({result.mode}, {result.tokens} tokens, "
              f"{result.windows} windows of {result.ctx}; KV {kv:.4f} of uncompressed at ctx {args.ctx})")
    return 0


def cmd_eval_quality(args: argparse.Namespace) -> int:
    import datetime as dt

    from zeroc.compression.calibrate import ZeroCMethod
    from zeroc.eval.quality import QualityConfig, machine_description, run_quality
    from zeroc.eval.quality_report import text_table, write_report

    cfg = QualityConfig(ctx=args.ctx, max_tokens=args.max_tokens, budgets=tuple(args.budgets),
                        batch_size=args.batch_size, zeroc_modes=tuple(args.zeroc_modes),
                        prefill_tokens=args.prefill_tokens, score_tokens=args.score_tokens,
                        calibration=ZeroCMethod(rank_multiple=args.rank_multiple, calib_tokens=args.calib_tokens,
                                                sensitivity_tokens=args.sensitivity_tokens, window=args.window,
                                                granularity=args.rank_granularity))
    loaded, _ = common.load(args)
    started = dt.datetime.now(dt.timezone.utc)
    rows = run_quality(loaded, args.calib, args.data, cfg, progress=not args.json)
    minutes = (dt.datetime.now(dt.timezone.utc) - started).total_seconds() / 60
    meta = {"model": loaded.path.name, "data": Path(args.data).name, "calibration text": Path(args.calib).name,
            "date": started.strftime("%Y-%m-%d %H:%M UTC"), "machine": machine_description(),
            "command": "zeroc eval quality " + " ".join(args.argv), "windows": f"ctx {cfg.ctx}, max tokens "
            f"{cfg.max_tokens}; prefill-then-score: prefill {cfg.prefill_tokens}, score {cfg.score_tokens}", "ZeroC calibration": str(cfg.calibration), "wall time": f"{minutes:.1f} min"}
    md, png = write_report(rows, Path(args.out_dir), meta)
    if args.json:
        print(json.dumps({"rows": [asdict(r) for r in rows], "markdown": str(md), "plot": str(png), **meta}))
    else:
        print(text_table(rows))
        print(f"wrote {md} and {png}")
    return 0


def cmd_eval_longctx(args: argparse.Namespace) -> int:
    import datetime as dt

    from zeroc.eval.longctx import LongCtxConfig, run_longctx
    from zeroc.eval.longctx_report import table, write_report
    from zeroc.eval.quality import machine_description

    cfg = LongCtxConfig(contexts=tuple(args.contexts), tasks=tuple(args.tasks), per_cell=args.samples,
                        budgets=tuple(args.budgets), methods=tuple(args.methods), zeroc=args.zeroc, seed=args.seed,
                        batch_size=args.batch_size, chunk=args.chunk)
    loaded, _ = common.load(args)
    started = dt.datetime.now(dt.timezone.utc)
    rows = run_longctx(loaded, args.data, cfg, args.calib, progress=not args.json)
    minutes = (dt.datetime.now(dt.timezone.utc) - started).total_seconds() / 60
    meta = {"model": loaded.path.name, "data": Path(args.data).name, "date": started.strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine_description(), "command": "zeroc " + " ".join(args.argv),
            "seed": str(cfg.seed), "wall time": f"{minutes:.1f} min"}
    md, png = write_report(rows, Path(args.out_dir), meta)
    if args.json:
        print(json.dumps({"rows": [asdict(r) for r in rows], "markdown": str(md), "plot": str(png), **meta}))
    else:
        print("\n".join(table(rows)))
        print(f"wrote {md} and {png}")
    return 0


def _longctx_arguments(p: argparse.ArgumentParser) -> None:
    from zeroc.eval.longctx_tasks import TASKS

    common.model_args(p)
    p.add_argument("--data", default=str(BUNDLED_HELDOUT), help="held-out text the haystacks come from")
    p.add_argument("--calib", default=str(BUNDLED_CALIB), help="calibration text for ZeroC (with --zeroc)")
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096],
                   help="prompt lengths in tokens (clipped to the model's positions)")
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    p.add_argument("--samples", type=int, default=5, help="samples per task and context length")
    p.add_argument("--budgets", type=float, nargs="+", default=[1.0, 0.5, 0.25])
    p.add_argument("--methods", nargs="*", choices=POLICY_NAMES, default=list(POLICY_NAMES),
                   help="registry methods (the uncompressed cache always runs; none given: only it)")
    p.add_argument("--zeroc", action="store_true", help="also ZeroC calibrated at each budget")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=4, help="samples through the cache together")
    p.add_argument("--chunk", type=int, default=512, help="prefill chunk in tokens")
    p.add_argument("--out-dir", default="docs", help="where longctx.md and longctx.png go")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval_longctx)


def add_arguments(sub: argparse._SubParsersAction) -> None:
    """Eval ppl | quality | longctx."""
    ev = sub.add_parser("eval", help="evaluate a model").add_subparsers(dest="what", required=True)
    p = ev.add_parser("ppl", help="perplexity on a text file")
    common.model_args(p)
    p.add_argument("--data", default=str(BUNDLED_HELDOUT))
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--streaming", action="store_true", help="token by token through the paged cache")
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=16, help="windows decoded together in streaming mode")
    p.add_argument("--kv-policy", default="none", choices=[NONE, *POLICY_NAMES],
                   help="KV-cache baseline deciding what attention sees (needs --streaming)")
    p.add_argument("--kv-budget", type=float, default=1.0, help="KV bytes as a fraction of the fp16 cache")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval_ppl)

    p = ev.add_parser("quality", help="perplexity of ZeroC and every baseline at equal KV budgets -> docs/")
    common.model_args(p)
    p.add_argument("--calib", default=str(BUNDLED_CALIB), help="calibration text for ZeroC")
    p.add_argument("--data", default=str(BUNDLED_HELDOUT), help="held-out text to score")
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens")
    p.add_argument("--budgets", type=float, nargs="+", default=[1.0, 0.75, 0.5, 0.375, 0.25])
    p.add_argument("--batch-size", type=int, default=16, help="windows streamed together")
    p.add_argument("--prefill-tokens", type=int, default=768,
                   help="prefill-then-score protocol: tokens prefilled and compressed per window")
    p.add_argument("--score-tokens", type=int, default=256, help="prefill-then-score protocol: tokens scored after")
    common.calibration_args(p, "--calib-tokens")
    p.add_argument("--zeroc-modes", nargs="+", choices=["fold", "rotate", "auto"], default=["auto"],
                   help="ZeroC Q/K modes to tabulate (rows zeroc[-MODE] and zeroc[-MODE]-int8; auto is plain zeroc)")
    p.add_argument("--out-dir", default="docs", help="where quality.md and quality.png go")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval_quality)

    _longctx_arguments(ev.add_parser("longctx", help="retrieval accuracy per KV method and budget -> docs/"))
