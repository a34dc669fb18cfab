"""Would per-KV-head ranks pay? Per layer, at equal bytes: both KV heads at rank m, or one at m - δ and the
other at m + δ, measured as the KL(source || compressed) each choice adds on calibration text.

    python benchmarks/per_head_ranks.py [--base-rank 32] [--ranks 16 24] [--delta 8] [--json]

The bundled model is compressed in rotate mode at Q/K rank `--base-rank` (V at the same rank) in every
layer; a head at rank r < base is that model with its bases' columns past r zeroed, which is exactly the
rank-r head (any prefix of the bases is the optimal rank-r choice, `fold.qk_factors`). Factors are fitted
on the first 2048 calibration tokens and KL is measured on 2048 later ones. The runtime's ranks are per
layer (docs/compression.md); this measures what per-head ranks would gain before building them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from zeroc.compression.calibrate import collect_statistics, compute_factors  # noqa: E402
from zeroc.compression.fold import build_compressed  # noqa: E402
from zeroc.config import BUNDLED_CALIB, BUNDLED_MODEL, AttentionCompression  # noqa: E402
from zeroc.evaluate import read_eval_tokens  # noqa: E402
from zeroc.loader import load_model  # noqa: E402


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-rank", type=int, default=32)
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 24], help="the equal-bytes mean rank m")
    parser.add_argument("--delta", type=int, default=8)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    loaded = load_model(BUNDLED_MODEL)
    model, cfg = loaded.model, loaded.config
    if cfg.num_key_value_heads != 2:
        raise SystemExit("this comparison splits ranks between two KV heads")
    tokens = read_eval_tokens(loaded.tokenizer, BUNDLED_CALIB, 8192)
    fit, held = tokens[:2048].view(4, 512), tokens[4096:6144].view(4, 512)
    factors = compute_factors(model, collect_statistics(model, fit, progress=False))
    base = args.base_rank
    layout = AttentionCompression(tuple(f.layer_compression(base, base, "rotate") for f in factors), "per-head", 0.5)
    comp = build_compressed(model, factors, layout)
    ref = F.log_softmax(model(held).float(), -1)

    def kl() -> float:
        lp = F.log_softmax(comp(held).float(), -1)
        return F.kl_div(lp, ref, log_target=True, reduction="none").sum(-1).mean().item()

    def at_ranks(layer: int, ranks: tuple[int, int]) -> float:
        """KL with KV head g of `layer` at Q/K rank ranks[g] (the bases' later columns zeroed)."""
        attn = comp.model.layers[layer].self_attn
        saved = attn.q_basis.data.clone(), attn.k_basis.data.clone()
        for basis in (attn.q_basis, attn.k_basis):
            for g, r in enumerate(ranks):
                basis.data[g, :, r:] = 0
        out = kl()
        attn.q_basis.data.copy_(saved[0])
        attn.k_basis.data.copy_(saved[1])
        return out

    start, rows = kl(), []
    plan = [(m, layer) for m in args.ranks for layer in range(cfg.num_hidden_layers)]
    for m, layer in tqdm(plan, desc="layers", disable=args.json):
        d = args.delta
        added = {name: at_ranks(layer, ranks) - start
                 for name, ranks in (("uniform", (m, m)), ("head0_low", (m - d, m + d)), ("head1_low", (m + d, m - d)))}
        best = min(added["head0_low"], added["head1_low"])
        rows.append({"rank": m, "layer": layer, **added, "best_split_over_uniform": best / added["uniform"]})
    if args.json:
        print(json.dumps({"base_rank": base, "delta": args.delta, "base_kl": start, "rows": rows}))
        return
    print(f"rotate Q/K, base rank {base} everywhere (KL {start:.4f}); KL added by one layer at mean rank m, "
          f"split +-{args.delta} between its 2 KV heads:")
    print("   m  layer   uniform  head0 low  head1 low  best split / uniform")
    for r in rows:
        print(f"{r['rank']:>4} {r['layer']:>6} {r['uniform']:>9.4f} {r['head0_low']:>10.4f} {r['head1_low']:>10.4f} "
              f"{r['best_split_over_uniform']:>21.2f}")


if __name__ == "__main__":
    main()
