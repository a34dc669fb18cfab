"""`zeroc calibrate`: ZeroC-compress a model."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from zeroc.cli import common
from zeroc.config import BUNDLED_CALIB


def cmd_calibrate(args: argparse.Namespace) -> int:
    from zeroc.compression.calibrate import ZeroCMethod
    from zeroc.compression.layerwise import calibrate_model
    from zeroc.loader import save_model

    method = ZeroCMethod(budget=args.budget, mode=args.mode, rank_multiple=args.rank_multiple,
                         calib_tokens=args.tokens, sensitivity_tokens=args.sensitivity_tokens, window=args.window,
                         ablation_tokens=args.ablation_tokens, sinks=args.sinks, recent=args.recent,
                         granularity=args.rank_granularity, sensitivity=args.sensitivity,
                         max_passes=args.max_passes, time_budget=args.time_budget)
    loaded, _ = common.load(args)
    compressed, report = calibrate_model(loaded, args.calib, method, progress=not args.json,
                                         checkpoint=args.checkpoint)
    out = save_model(compressed, loaded.tokenizer, args.out)
    (out / "calibration.json").write_text(json.dumps({"method": asdict(method), **asdict(report)}, indent=2) + "\n")
    if args.json:
        print(json.dumps(asdict(report)))
    else:
        print(f"wrote {out}: KV {report.kv_fraction:.3f} of uncompressed, ranks (qk, v) per layer {report.ranks}, "
              f"Q/K modes {report.modes}, calibration loss {report.base_loss:.4f} -> {report.compressed_loss:.4f}"
              + (f"; full-rank tier: {method.sinks} sinks + {method.recent} recent tokens"
                 if method.sinks or method.recent else ""))
    return 0


def add_arguments(sub: argparse._SubParsersAction) -> None:
    """Calibrate: ZeroC compression."""
    p = sub.add_parser("calibrate", help="compress a model's attention (ZeroC) and save it")
    common.model_args(p)
    p.add_argument("--calib", default=str(BUNDLED_CALIB), help="calibration text file")
    p.add_argument("--budget", type=float, required=True, help="KV cache size as a fraction of uncompressed")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--mode", choices=["fold", "rotate", "auto"], default="auto",
                   help="Q/K: keep RoPE pairs (fold), post-RoPE bases (rotate), or per layer by measured KL (auto)")
    common.calibration_args(p, "--tokens")
    p.add_argument("--ablation-tokens", type=int, default=1024, help="tokens whose activations rank RoPE pairs (fold)")
    p.add_argument("--sinks", type=int, default=0,
                   help="token tier: first tokens kept at full rank for every query (default 0 = off)")
    p.add_argument("--recent", type=int, default=0,
                   help="token tier: each query's last tokens kept at full rank, compressed once they age out "
                        "(default 0 = off; served too, without prefix reuse: docs/compression.md)")
    p.add_argument("--sensitivity", choices=["kl", "local", "auto"], default="auto",
                   help="how each cut's cost is measured: kl, a full-model KL pass per cut (layers x KV heads x "
                        "modes x ranks passes); local, layer by layer: attention-output error scaled to KL by two "
                        "full passes per layer; auto (default): kl up to --max-passes (default 512) passes, else "
                        "local (zeroc/compression/layerwise.py)")
    p.add_argument("--max-passes", type=int, default=None,
                   help="full-model KL passes the sensitivity may run (local: layers beyond it borrow the nearest "
                        "measured layer's scale)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="local: seconds after which no further KL pass starts")
    p.add_argument("--checkpoint", default=None,
                   help="local: a file where progress is saved after every layer and KL pass; run the same "
                        "command again to resume")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_calibrate)
