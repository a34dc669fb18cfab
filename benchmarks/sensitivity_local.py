"""The layer-local sensitivity (zeroc/compression/layerwise.py) against the full-KL one on the bundled model.

    python benchmarks/sensitivity_local.py [--budgets 0.75 0.5 0.375 0.25] [--tokens 2048 8192]
                                           [--calib-tokens 16384] [--sensitivity-tokens 2048] [--json]

Both calibrate with `zeroc calibrate`'s defaults (or the token counts given) on data/calib.txt (each measured once, then compressed at every
budget); per budget: the calibration's measured KL(source || compressed), and full-pass perplexity of the first N
held-out tokens at ctx 1024 for each N in `--tokens`. Also the wall time of each measurement and its full-model
passes.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import torch

from zeroc.compression.calibrate import ZeroCMethod, compress
from zeroc.compression.layerwise import full_kl_passes, measure_any
from zeroc.config import BUNDLED_CALIB, BUNDLED_HELDOUT, BUNDLED_MODEL
from zeroc.data import read_eval_tokens
from zeroc.eval.perplexity import perplexity_full
from zeroc.loader import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.75, 0.5, 0.375, 0.25])
    ap.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--sensitivity-tokens", type=int, default=2048)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    loaded = load_model(BUNDLED_MODEL)
    heldout = read_eval_tokens(loaded.tokenizer, BUNDLED_HELDOUT)
    base = {n: perplexity_full(loaded.model, heldout[:n], 1024, progress=False).perplexity for n in args.tokens}
    rows = []
    for sens in ("kl", "local"):
        method = ZeroCMethod(sensitivity=sens, calib_tokens=args.calib_tokens,
                             sensitivity_tokens=args.sensitivity_tokens)
        start = time.perf_counter()
        meas = measure_any(loaded, BUNDLED_CALIB, method, progress=not args.json)
        seconds = time.perf_counter() - start
        passes = full_kl_passes(loaded.config, method) if sens == "kl" else 2 * loaded.config.num_hidden_layers
        for b in args.budgets:
            model, report = compress(loaded, meas, replace(method, budget=b))
            ppl = {n: perplexity_full(model, heldout[:n], 1024, progress=False).perplexity for n in args.tokens}
            rows.append({"sensitivity": sens, "budget": b, "measure_s": seconds, "passes": passes,
                         "kl": report.measured_kl, "kv_fraction": report.kv_fraction, "ppl": ppl})
    if args.json:
        print(json.dumps({"uncompressed": base, "rows": rows}))
        return
    cols = " | ".join(f"ppl {n} tok" for n in args.tokens)
    print(f"calibration tokens {args.calib_tokens}, sensitivity tokens {args.sensitivity_tokens}; uncompressed: " + ", ".join(f"{base[n]:.3f} ({n} tok)" for n in args.tokens))
    print(f"| sensitivity | budget | KL | {cols} | measure s | full passes |\n|---|---|---|" + "---|" * len(args.tokens)
          + "---|---|")
    for r in rows:
        ppl = " | ".join(f"{r['ppl'][n]:.3f}" for n in args.tokens)
        print(f"| {r['sensitivity']} | {r['budget']} | {r['kl']:.5f} | {ppl} | {r['measure_s']:.0f} | {r['passes']} |")


if __name__ == "__main__":
    main()
