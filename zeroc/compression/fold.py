"""ZeroC folding: compressed Q/K/V written into the model's own weight matrices.

Per layer and KV head g (head dim d, query heads h in g's group):
- Q/K, fold mode: keep a subset of RoPE frequency pairs (i, i + d/2). Pair selection commutes
  with RoPE, so the kept rows of W_q and W_k are the compressed projections; RoPE runs on the
  kept pairs with their own frequencies. Pairs are ranked by greedy ablation on calibration
  activations: repeatedly drop the pair whose removal adds the least attention-output error as
  W_o sees it, sum_h E||W_o,h (o_h - o_h^full)||^2 over the KV head's query group.
- Q/K, rotate mode: after RoPE, q' = A^T q (every query head of the group) and k' = B^T k, with
  A, B [d, r] minimising E[(q^T (I - A B^T) k)^2] summed over the group, for independent q and k
  with post-RoPE second moments Q = sum_h E[q_h q_h^T] and K = E[k k^T]. That error is
  ||Q^1/2 (I - A B^T) K^1/2||_F^2, so the optimum is the truncated SVD U S V^T of Q^1/2 K^1/2:
  A = Q^-1/2 U S^1/2, B = K^-1/2 V S^1/2 (then E[q'q'^T] = E[k'k'^T] = S: balanced scales).
  At r = d, A B^T = I.
- V/O: values v = W_v,g x are replaced by v' = A^T v (r dims) and each O block by W_o,h B, where
  B A^T is the rank-r projection minimising sum_h E||W_o,h (v - B A^T v)||^2: with the output
  metric M = sum_h W_o,h^T W_o,h and value covariance C = E[v v^T], take the top-r eigenvectors
  U of M^1/2 C M^1/2; A^T = U^T M^1/2, B = M^-1/2 U ("whitened PCA"). At r = d, B A^T = I.
- Token tier (zeroc/tier.py): the complement of each cut (dropped pairs' rows; V directions past
  the rank, folded into W_v and W_o alike), so compressed + complement is the full-rank layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from zeroc.config import AttentionCompression, LayerCompression, ModelConfig, ranks_per_head
from zeroc.model import Attention, Transformer
from zeroc.rope import layer_inv_freq


@dataclass(frozen=True)
class LayerFactors:
    """Calibrated, rank-ordered factors of one layer; any rank is a prefix of these orders."""

    pair_order: Tensor  # [kv_heads, d/2] pair indices, most important first
    v_down: Tensor  # [kv_heads, d, d] rows of A^T, most important first (v' = v_down[:r] @ v)
    v_up: Tensor  # [kv_heads, d, d] columns of B, same order (o-block' = W_o,h @ v_up[:, :r])
    q_basis: Tensor  # [kv_heads, d, d] rotate mode: columns of A, most important first
    k_basis: Tensor  # [kv_heads, d, d] rotate mode: columns of B, same order

    def layer_compression(self, qk_rank: int | tuple[int, ...], v_rank: int | tuple[int, ...],
                          mode: str = "fold") -> LayerCompression:
        """The layer at these ranks: one for every KV head, or one per KV head."""
        if mode == "rotate":
            return LayerCompression((), v_rank, "rotate", qk_rank)
        ranks = ranks_per_head(qk_rank, self.pair_order.shape[0])
        pairs = [sorted(order[: r // 2].tolist()) for order, r in zip(self.pair_order, ranks)]
        return LayerCompression(tuple(tuple(p) for p in pairs), v_rank)


ABLATION_QUERY_STRIDE = 4  # ablation scores every 4th query position (against its whole causal context)
ABLATION_CHUNK = 4  # candidate pairs whose attention runs at once (2 x 3 heads x 128 x 512 scores: 3 MB each)


@torch.inference_mode()
def ablation_pair_order(q: Tensor, k: Tensor, v: Tensor, o_metric: Tensor, scale: float) -> Tensor:
    """Pairs of one KV head, most important first, by greedy ablation (fold mode).

    q: [B, group, T, d] post-RoPE queries of the group's heads; k, v: [B, 1, T, d] post-RoPE keys and
    values; o_metric: [group, d, d] W_o,h^T W_o,h per query head -> [d/2] pair indices. Each step
    drops the pair whose removal (from q and k) adds the least sum_h E[e_h^T M_h e_h], e_h being the
    change of head h's causal attention output; the pairs dropped last rank first. Every
    ABLATION_QUERY_STRIDE-th query is scored (a quarter of the attention work of all of them).

    A score q.k is a sum over pairs, so each pair's share of every score is computed once ([B, d/2, group, Tq, T]
    floats): a candidate's scores are the kept pairs' sum less its own share, and only its softmax and P.V run,
    ABLATION_CHUNK candidates at a time (a few MB each, reused rather than faulted in afresh).
    """
    half, t = q.shape[-1] // 2, q.shape[-2]
    rows = torch.arange(ABLATION_QUERY_STRIDE - 1, t, ABLATION_QUERY_STRIDE, device=q.device) \
        if t >= ABLATION_QUERY_STRIDE else torch.arange(t, device=q.device)
    future = torch.arange(t, device=q.device)[None, :] > rows[:, None]  # [Tq, T]: keys after each scored query
    masked = torch.zeros(future.shape, device=q.device).masked_fill(future, float("-inf"))
    qp = (q[..., rows, :] * scale).unflatten(-1, (2, half))  # [B, group, Tq, 2, d/2]: pair i is (.., 0, i), (.., 1, i)
    kp = k.unflatten(-1, (2, half))  # [B, 1, T, 2, d/2]
    shares = torch.einsum("bhqpi,bktpi->bihqt", qp, kp)  # [B, d/2, group, Tq, T]: each pair's share of the scores
    values = v[:, 0]  # [B, T, d]

    def outputs(scores: Tensor) -> Tensor:  # scores [B, C, group, Tq, T] -> attention outputs [B, C, group, Tq, d]
        probs = torch.softmax(scores, dim=-1)
        return torch.bmm(probs.flatten(1, 3), values).view(*probs.shape[:-1], -1)

    full = outputs(shares.sum(1, keepdim=True) + masked)  # [B, 1, group, Tq, d]

    def errors(keep: list[int]) -> Tensor:  # -> [len(keep)]: the error of dropping each kept pair
        kept = masked + shares[:, keep[0]: keep[0] + 1]  # [B, 1, group, Tq, T], summed afresh (no drift), in place
        for j in keep[1:]:
            kept += shares[:, j: j + 1]
        out = []
        for c in range(0, len(keep), ABLATION_CHUNK):
            e = outputs(kept - shares[:, keep[c: c + ABLATION_CHUNK]]) - full  # [B, C, group, Tq, d]
            out.append(torch.einsum("bchtd,hde,bchte->c", e, o_metric, e))
        return torch.cat(out)

    keep, dropped = list(range(half)), []
    while len(keep) > 1:
        cheapest = keep[int(errors(keep).argmin())]
        keep.remove(cheapest)
        dropped.append(cheapest)
    return torch.tensor(keep + dropped[::-1])


def _sym_roots(m: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    # m: [d, d] symmetric PSD -> (m^1/2, m^-1/2) from the same eigenvalues, floored at eps * max for
    # stability, so that their product is exactly the identity
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    vals = vals.clamp(min=eps * vals.max().clamp(min=1e-30))
    return (vecs * vals.sqrt()) @ vecs.T, (vecs * vals.rsqrt()) @ vecs.T


def value_factors(v_cov: Tensor, o_blocks: Tensor, eps: float = 1e-8) -> tuple[Tensor, Tensor]:
    """Whitened-PCA factors for one KV head.

    v_cov: [d, d] E[v v^T]; o_blocks: [group, hidden, d] W_o,h of the group's query heads
    -> (down [d, d] rows ordered by importance, up [d, d] columns in the same order)
    """
    v_cov, o_blocks = v_cov.double(), o_blocks.double()
    metric = torch.einsum("ghd,ghe->de", o_blocks, o_blocks)  # [d, d] = sum_h W_o,h^T W_o,h
    root, inv_root = _sym_roots(metric, eps)
    target = root @ v_cov @ root
    vals, vecs = torch.linalg.eigh((target + target.T) / 2)
    u = vecs[:, torch.argsort(vals, descending=True)]  # [d, d]
    return u.T @ root, inv_root @ u


def qk_factors(q_cov: Tensor, k_cov: Tensor, eps: float = 1e-8) -> tuple[Tensor, Tensor]:
    """Rotate-mode bases for one KV head.

    q_cov: [d, d] sum over the group's query heads of E[q q^T] after RoPE; k_cov: [d, d] E[k k^T] after
    RoPE -> (A [d, d], B [d, d]) columns ordered by singular value; any prefix of r columns is optimal.
    """
    q_root, q_inv = _sym_roots(q_cov.double(), eps)
    k_root, k_inv = _sym_roots(k_cov.double(), eps)
    u, s, vh = torch.linalg.svd(q_root @ k_root)
    half = s.sqrt()
    return q_inv @ u * half, k_inv @ vh.T * half


def _pair_rows(attn, cfg: ModelConfig, pairs: tuple[tuple[int, ...], ...], prefix: str) -> dict[str, Tensor]:
    """Rows of W_q, W_k (and biases) for the RoPE pairs listed per KV head -> `{prefix}q_proj.*`, `{prefix}k_proj.*`."""
    d, group, half = cfg.head_dim, cfg.group_size, cfg.head_dim // 2
    q_rows, k_rows = [], []
    for g, kept in enumerate(pairs):
        keep = torch.tensor(kept, dtype=torch.long)
        dims = torch.cat([keep, keep + half])  # first halves, then second halves: rotate_half layout
        k_rows.append(g * d + dims)
        q_rows.extend((g * group + j) * d + dims for j in range(group))
    q_rows, k_rows = torch.cat(q_rows), torch.cat(k_rows)
    out = {f"{prefix}q_proj.weight": attn.q_proj.weight[q_rows], f"{prefix}k_proj.weight": attn.k_proj.weight[k_rows]}
    if attn.q_proj.bias is not None:
        out[f"{prefix}q_proj.bias"] = attn.q_proj.bias[q_rows]
        out[f"{prefix}k_proj.bias"] = attn.k_proj.bias[k_rows]
    return out


def _value_weights(attn, cfg: ModelConfig, factors: LayerFactors, dims: list[slice],
                   prefix: str) -> dict[str, Tensor]:
    """W_v folded onto the V basis directions `dims[g]` of each KV head g (rows of A^T) and W_o onto the
    matching columns of B -> `{prefix}v_proj.*`, `{prefix}o_proj.weight` (heads in order, each its own width)."""
    d, n_kv, group = cfg.head_dim, cfg.num_key_value_heads, cfg.group_size
    dtype = attn.q_proj.weight.dtype
    wv = attn.v_proj.weight.double().view(n_kv, d, -1)  # [kv, d, hidden]
    wo = attn.o_proj.weight.double().view(-1, n_kv, group, d)  # [hidden, kv, group, d]
    bv = None if attn.v_proj.bias is None else attn.v_proj.bias.double().view(n_kv, d)
    v_rows, o_cols, v_bias = [], [], []
    for g, cut in enumerate(dims):
        down = factors.v_down[g, cut].double()  # [r, d]
        v_rows.append(down @ wv[g])  # [r, hidden]
        o_cols.append(torch.einsum("hjd,dr->hjr", wo[:, g], factors.v_up[g, :, cut].double()).flatten(1))
        if bv is not None:
            v_bias.append(down @ bv[g])
    out = {f"{prefix}v_proj.weight": torch.cat(v_rows).to(dtype),
           f"{prefix}o_proj.weight": torch.cat(o_cols, 1).to(dtype)}
    if bv is not None:
        out[f"{prefix}v_proj.bias"] = torch.cat(v_bias).to(dtype)
    return out


def _basis_columns(basis: Tensor, cuts: list[slice], dtype: torch.dtype) -> Tensor:
    """Columns `cuts[g]` of each KV head's basis [kv, d, d] -> [kv, d, widest cut], zero past a head's own."""
    widths = [len(range(*cut.indices(basis.shape[-1]))) for cut in cuts]
    out = basis.new_zeros(basis.shape[0], basis.shape[1], max(widths))
    for g, (cut, w) in enumerate(zip(cuts, widths)):
        out[g, :, :w] = basis[g, :, cut]
    return out.to(dtype)


def fold_layer(attn, cfg: ModelConfig, factors: LayerFactors, comp: LayerCompression) -> dict[str, Tensor]:
    """Compressed weights of one attention block -> state-dict entries relative to `self_attn.`."""
    kv, dtype = cfg.num_key_value_heads, attn.q_proj.weight.dtype
    if comp.mode == "rotate":
        cuts = [slice(0, r) for r in comp.qk_ranks(kv)]
        out = {"q_basis": _basis_columns(factors.q_basis, cuts, dtype),
               "k_basis": _basis_columns(factors.k_basis, cuts, dtype)}
    else:
        out = _pair_rows(attn, cfg, comp.qk_pairs, "")
    out.update(_value_weights(attn, cfg, factors, [slice(0, r) for r in comp.v_ranks(kv)], ""))  # o_proj.bias stays
    return out


def tier_layer(attn, cfg: ModelConfig, factors: LayerFactors, comp: LayerCompression) -> dict[str, Tensor]:
    """What a token tier adds to one compressed block: the complement of each cut, so that the compressed
    and `tier_*` weights together are the full-rank layer (state-dict entries relative to `self_attn.`).
    Fold: the dropped pairs' rows of W_q, W_k; rotate: the bases' columns past qk_rank (A B^T = I at full
    rank, `qk_factors`, so q.k = (A_r^T q).(B_r^T k) + (A_c^T q).(B_c^T k)). V/O: the V basis directions past
    v_rank, folded into W_v and W_o as the kept ones are."""
    kv, d, dtype = cfg.num_key_value_heads, cfg.head_dim, attn.q_proj.weight.dtype
    if comp.mode == "rotate":
        cuts = [slice(r, d) for r in comp.qk_ranks(kv)]
        out = {"tier_q_basis": _basis_columns(factors.q_basis, cuts, dtype),
               "tier_k_basis": _basis_columns(factors.k_basis, cuts, dtype)}
    else:
        out = _pair_rows(attn, cfg, comp.dropped_pairs(d), "tier_")
    out.update(_value_weights(attn, cfg, factors, [slice(r, d) for r in comp.v_ranks(kv)], "tier_"))
    return out


def build_compressed(model: Transformer, factors: list[LayerFactors], layout: AttentionCompression) -> Transformer:
    """A new Transformer with every layer folded as `layout` says, on the source model's attention backend (the
    source model is untouched)."""
    cfg = ModelConfig(**{**model.config.__dict__, "compression": layout})
    state = dict(model.state_dict())
    for i, (layer, f, comp) in enumerate(zip(model.model.layers, factors, layout.layers)):
        weights = fold_layer(layer.self_attn, model.config, f, comp)
        if layout.has_tier:
            weights.update(tier_layer(layer.self_attn, model.config, f, comp))
        for name, tensor in weights.items():
            state[f"model.layers.{i}.self_attn.{name}"] = tensor
    param = next(model.parameters())
    with torch.device("meta"):
        out = Transformer(cfg, backend=model.backend)
    out = out.to_empty(device=param.device)
    out.load_state_dict({k: v.to(param.dtype) for k, v in state.items()}, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        out.lm_head.weight = out.model.embed_tokens.weight
    out.init_rope()
    return out.eval().requires_grad_(False)


def whole_layer(cfg: ModelConfig) -> LayerCompression:
    """A layer kept whole: every RoPE pair of every KV head, V at full rank."""
    return LayerCompression(tuple(tuple(range(cfg.head_dim // 2)) for _ in range(cfg.num_key_value_heads)),
                            cfg.head_dim)


@torch.inference_mode()
def cut_attention(attn: Attention, cfg: ModelConfig, index: int, factors: LayerFactors,
                  comp: LayerCompression) -> Attention:
    """Layer `index`'s attention folded as `comp` (a new module sharing the untouched weights): what calibration
    measures a cut on, the model's other layers kept as they are."""
    layers = [whole_layer(cfg)] * cfg.num_hidden_layers
    layers[index] = comp
    cut_cfg = ModelConfig(**{**cfg.__dict__, "compression": AttentionCompression(tuple(layers), "", 1.0)})
    with torch.device("meta"):
        out = Attention(cut_cfg, index)
    out.load_state_dict({**attn.state_dict(), **fold_layer(attn, cfg, factors, comp)}, assign=True)
    out.inv_freq = layer_inv_freq(cut_cfg, index).to(attn.o_proj.weight.device)
    return out.eval()
