"""A Llama-family transformer: RMSNorm, RoPE, GQA attention, SwiGLU.

Two ways through the same weights:
- `Transformer.forward(tokens)` attends densely with a causal mask ([B, T] in, logits out):
  training and full-pass evaluation.
- `Transformer.forward_paged(tokens, positions, batch, cache)` takes a flat ragged batch of
  new tokens, writes their K/V into the paged cache and attends over each sequence's cached
  context: prefill, decode and mixed continuous-batching steps. On CUDA it hands q and k to
  `FusedPagedAttend` before RoPE: one Triton epilogue applies RoPE (and rotate mode's bases) and
  writes K/V into their cache slots (kernels/qkv_epilogue.py).
- `Transformer.forward_attend(tokens, positions, attend)` lets the caller own attention and the
  cache (the KV-cache policies of `zeroc.policies`).
A compressed model with a full-rank token tier (zeroc/tier.py) runs the dense causal forward and
the paged one (its cache holds the tier: zeroc/tier_store.py), not the KV-cache policies.
Weight names follow Hugging Face's LlamaForCausalLM so checkpoints load without renaming.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zeroc_kernels.attention import paged_attention, use_triton
from zeroc.config import ModelConfig, RopeConfig
from zeroc.head_ranks import HeadLayout
from zeroc.kv_cache import PagedKVCache, PagedBatch
from zeroc.tier import tiered_attention

# attend(layer, q, k, v, scale) -> out; q: [..., heads, dq], k: [..., kv_heads, dq], v: [..., kv_heads, dv]
AttendFn = Callable[[int, Tensor, Tensor, Tensor, float], Tensor]


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> Tensor:
    """Inverse frequencies per rotary pair, with linear or llama3 scaling applied. [head_dim // 2]"""
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        old_len = rope.original_max_position_embeddings
        low_wavelen = old_len / rope.low_freq_factor
        high_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


def _pair_freqs(base: Tensor, pairs: tuple[tuple[int, ...], ...]) -> Tensor:
    # base: [d/2] -> [kv_heads, most pairs] frequencies of each KV head's pairs, zero past a head's own
    out = base.new_zeros(len(pairs), max(len(p) for p in pairs))
    for g, p in enumerate(pairs):
        out[g, : len(p)] = base[torch.tensor(p, dtype=torch.long)]
    return out


def layer_inv_freq(cfg: ModelConfig, layer: int) -> Tensor:
    """Frequencies of the RoPE pairs a layer keeps: [kv_heads, most pairs kept] (fold; zero past a KV head's
    own when its heads keep different numbers), or [1, head_dim / 2] if whole."""
    base = rope_inv_freq(cfg.rope, cfg.head_dim)
    if cfg.qk_mode(layer) != "fold":  # uncompressed and rotate mode run RoPE on every pair
        return base[None]
    return _pair_freqs(base, cfg.compression.layers[layer].qk_pairs)


def tier_inv_freq(cfg: ModelConfig, layer: int) -> Tensor:
    """Frequencies of the RoPE pairs a fold layer drops (its full-rank tier adds them back): [kv_heads, most
    pairs dropped], zero past a KV head's own."""
    base = rope_inv_freq(cfg.rope, cfg.head_dim)
    return _pair_freqs(base, cfg.compression.layers[layer].dropped_pairs(cfg.head_dim))


def rope_cos_sin(inv_freq: Tensor, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin for `positions` (any shape P) in HF's rotate_half layout. inv_freq: [H, r/2] -> [*P, H, r]"""
    freqs = positions.float()[..., None, None] * inv_freq.float()  # [*P, H, r/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [*P, H, r]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x: [*P, heads, d]; pairs are (i, i + d/2) as in HF's rotate_half
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rope_qk(q: Tensor, k: Tensor, inv_freq: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
    """RoPE on q [*P, heads, r] and k [*P, kv_heads, r]; inv_freq: [kv_heads or 1, r/2]; positions: [*P]."""
    cos, sin = rope_cos_sin(inv_freq, positions, q.dtype)  # [*P, kv_heads or 1, r]
    k = apply_rope(k, cos, sin)
    if cos.shape[-2] > 1:  # per-KV-head pairs: each query head uses its group's
        group = q.shape[-2] // k.shape[-2]
        cos, sin = cos.repeat_interleave(group, -2), sin.repeat_interleave(group, -2)
    return apply_rope(q, cos, sin), k


def causal_attend(_layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Dense causal attention over whole sequences (an AttendFn).

    q: [B, T, heads, dq]; k: [B, T, kv_heads, dq]; v: [B, T, kv_heads, dv] -> [B, T, heads, dv]
    """
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                         scale=scale, enable_gqa=True)
    return out.transpose(1, 2)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32 and scale in the input dtype, as HF does, so half precision matches.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    """GQA attention. A compressed layer keeps fewer V/O dims per head and fewer Q/K dims: fold mode
    keeps a subset of RoPE pairs (narrower q/k projections); rotate mode projects q and k after RoPE
    onto each KV head's calibrated bases (`q_basis`, `k_basis`), so the cache holds rank-wide keys.
    With a token tier, `tier_*` weights hold what the compression dropped: the dropped RoPE pairs' rows of
    W_q, W_k (fold) or the bases' complement columns (rotate), the complement of the V basis and its W_o
    columns, so that compressed + tier = the full-rank layer in a rotated basis."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        group, d, bias = cfg.group_size, cfg.head_dim, cfg.attention_bias
        self.head_dim = d
        qk, vr = cfg.head_ranks(layer)  # per KV head
        # per-KV-head ranks: runs of heads with equal ranks (zeroc/head_ranks.py); None: one width for all
        self.head_layout = HeadLayout.of(qk, vr, group) if cfg.per_head_ranks(layer) else None
        self.qk_dim, self.v_dim = (None, None) if self.head_layout else (qk[0], vr[0])
        self.rotate = cfg.qk_mode(layer) == "rotate"
        proj = (d,) * self.n_kv if self.rotate else qk  # rotate: RoPE needs every pair
        self.scale = 1.0 / math.sqrt(d)  # the model was trained with this, whatever the rank
        self.q_proj = nn.Linear(cfg.hidden_size, group * sum(proj), bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, sum(proj), bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, sum(vr), bias=bias)
        self.o_proj = nn.Linear(group * sum(vr), cfg.hidden_size, bias=bias)
        if self.rotate:  # q' = q_basis[g]^T RoPE(q) for every query head of group g; k' likewise
            # [kv, d, r]; with per-head ranks r = the widest, and head g's columns past its rank are zero
            self.q_basis = nn.Parameter(torch.empty(self.n_kv, d, max(qk)))
            self.k_basis = nn.Parameter(torch.empty(self.n_kv, d, max(qk)))
        self.register_buffer("inv_freq", layer_inv_freq(cfg, layer), persistent=False)
        self.tier = (cfg.compression.sinks, cfg.compression.recent) if cfg.has_tier else None
        if self.tier is not None:
            tier_qk, tier_v = [d - r for r in qk], [d - r for r in vr]  # per KV head
            if self.rotate:  # the bases' complement columns: [kv, d, d - r] each (zero-padded past a head's)
                self.tier_q_basis = nn.Parameter(torch.empty(self.n_kv, d, max(tier_qk)))
                self.tier_k_basis = nn.Parameter(torch.empty(self.n_kv, d, max(tier_qk)))
            else:
                self.tier_q_proj = nn.Linear(cfg.hidden_size, group * sum(tier_qk), bias=bias)
                self.tier_k_proj = nn.Linear(cfg.hidden_size, sum(tier_qk), bias=bias)
                self.register_buffer("tier_inv_freq", tier_inv_freq(cfg, layer), persistent=False)
            self.tier_v_proj = nn.Linear(cfg.hidden_size, sum(tier_v), bias=bias)
            self.tier_o_proj = nn.Linear(group * sum(tier_v), cfg.hidden_size, bias=False)  # o_proj has the bias

    def forward(self, layer: int, x: Tensor, positions: Tensor, attend: AttendFn | FusedPagedAttend) -> Tensor:
        # x: [*P, hidden]; positions: [*P]
        if self.head_layout is not None:
            return self._per_head(layer, x, positions, attend)
        lead = x.shape[:-1]
        q = self.q_proj(x).view(*lead, self.n_heads, -1)
        k = self.k_proj(x).view(*lead, self.n_kv, -1)
        v = self.v_proj(x).view(*lead, self.n_kv, self.v_dim)
        if isinstance(attend, FusedPagedAttend):  # RoPE and the bases run inside its epilogue kernel
            return self.o_proj(attend.attend_raw(layer, self, q, k, v, positions).reshape(*lead, -1))
        q, k = rope_qk(q, k, self.inv_freq, positions)  # [*P, heads, qk_dim or d], [*P, kv_heads, qk_dim or d]
        if self.tier is not None:
            return self._tiered(layer, x, positions, q, k, v, attend)
        if self.rotate:
            q, k = rotate_qk(q, k, self.q_basis, self.k_basis)
        out = attend(layer, q, k, v, self.scale)  # [*P, heads, v_dim]
        return self.o_proj(out.reshape(*lead, -1))

    def _tiered(self, layer: int, x: Tensor, positions: Tensor, q: Tensor, k: Tensor, v: Tensor,
                attend: AttendFn) -> Tensor:
        """Attention with the token tier (zeroc/tier.py): dense causal, or through a tier cache's store.
        x: [*P, hidden]; positions: [*P]; q: [*P, heads, *] and k: [*P, kv_heads, *] after RoPE;
        v: [*P, kv_heads, v_dim]."""
        _check_tier_attend(attend)
        lead = x.shape[:-1]
        # Full-rank q, k: the compressed dims, then the complement (q·k sums over both): fold, the dropped
        # RoPE pairs; rotate, the post-RoPE q, k on the bases' complement columns (A B^T = I at full rank).
        if self.rotate:
            q_tier, k_tier = rotate_qk(q, k, self.tier_q_basis, self.tier_k_basis)
            q, k = rotate_qk(q, k, self.q_basis, self.k_basis)
        else:
            q_tier = self.tier_q_proj(x).view(*lead, self.n_heads, -1)
            k_tier = self.tier_k_proj(x).view(*lead, self.n_kv, -1)
            q_tier, k_tier = rope_qk(q_tier, k_tier, self.tier_inv_freq, positions)
        q_full, k_full = torch.cat([q, q_tier], -1), torch.cat([k, k_tier], -1)  # [*P, *, d]
        v_full = torch.cat([v, self.tier_v_proj(x).view(*lead, self.n_kv, -1)], -1)  # [*P, kv_heads, d]
        if attend is causal_attend:
            out = tiered_attention(q, k, v, q_full, k_full, v_full, *self.tier, self.scale)  # [B, T, heads, d]
        else:  # the tier store reads the compressed dims first, the tier's after them (TierLayer)
            out = attend(layer, q_full, k_full, v_full, self.scale)
        out_kept, out_rest = out.split([self.v_dim, out.shape[-1] - self.v_dim], -1)
        return self.o_proj(out_kept.reshape(*lead, -1)) + self.tier_o_proj(out_rest.reshape(*lead, -1))

    def _per_head(self, layer: int, x: Tensor, positions: Tensor, attend: AttendFn | FusedPagedAttend) -> Tensor:
        """A layer whose KV heads keep different ranks: every run of equal-rank heads is a GQA block of its own
        widths (zeroc/head_ranks.py). x: [*P, hidden]; positions: [*P]"""
        lay, lead = self.head_layout, x.shape[:-1]
        runs = lay.runs
        vs = lay.split(self.v_proj(x), [r.v for r in runs])  # per run [*P, n, v]
        tiers = None  # per run the tier's q, k dims: fold, the dropped pairs; rotate, the complement columns
        if self.rotate:  # every head is d wide through RoPE: project and rotate once, at the widest rank
            q = self.q_proj(x).view(*lead, self.n_heads, self.head_dim)
            k = self.k_proj(x).view(*lead, self.n_kv, self.head_dim)
            q, k = rope_qk(q, k, self.inv_freq, positions)
            qs, ks = lay.narrow(*rotate_qk(q, k, self.q_basis, self.k_basis), [r.qk for r in runs])
            if self.tier is not None:
                tiers = lay.narrow(*rotate_qk(q, k, self.tier_q_basis, self.tier_k_basis),
                                   [self.head_dim - r.qk for r in runs])
        else:  # fold: each head's own kept pairs, RoPE at their own frequencies
            qs, ks = self._fold_runs(x, positions, self.q_proj, self.k_proj, self.inv_freq, [r.qk for r in runs])
            if self.tier is not None:
                tiers = self._fold_runs(x, positions, self.tier_q_proj, self.tier_k_proj, self.tier_inv_freq,
                                        [self.head_dim - r.qk for r in runs])
        if isinstance(attend, FusedPagedAttend):  # its epilogue writes whole heads; each run reads a pool view
            attend = PagedAttend(attend.cache, attend.batch)
        if tiers is not None:
            return self._per_head_tiered(layer, x, qs, ks, vs, *tiers, attend)
        if attend is causal_attend:  # each run at its own widths: exact FLOPs
            outs = [causal_attend(layer, q, k, v, self.scale) for q, k, v in zip(qs, ks, vs)]
        elif isinstance(attend, PagedAttend):
            outs = attend.attend_heads(layer, lay, qs, ks, vs, self.scale)
        else:  # a caller's attention (KV policies, calibration) sees one KV head of the cache row's width
            out = attend(layer, lay.queries(qs), lay.rows(ks), lay.rows(vs), self.scale)
            outs = lay.outputs(out, [r.v for r in runs])
        return self.o_proj(torch.cat([o.flatten(-2) for o in outs], -1))

    def _fold_runs(self, x: Tensor, positions: Tensor, q_proj: nn.Linear, k_proj: nn.Linear, inv_freq: Tensor,
                   widths: list[int]) -> tuple[list[Tensor], list[Tensor]]:
        """Fold mode's per-run q [*P, n * group, w] and k [*P, n, w] after RoPE; inv_freq: [kv, widest / 2]."""
        qs = self.head_layout.split(q_proj(x), widths, queries=True)
        ks = self.head_layout.split(k_proj(x), widths)
        for i, (r, w) in enumerate(zip(self.head_layout.runs, widths)):
            qs[i], ks[i] = rope_qk(qs[i], ks[i], inv_freq[r.start: r.stop, : w // 2], positions)
        return qs, ks

    def _per_head_tiered(self, layer: int, x: Tensor, q_comp: list[Tensor], k_comp: list[Tensor], vs: list[Tensor],
                         q_tier: list[Tensor], k_tier: list[Tensor], attend: AttendFn) -> Tensor:
        """`_tiered` for a layer with per-KV-head ranks, per run: q [*P, n * group, r] and k [*P, n, r] compressed
        after RoPE (and the bases), v [*P, n, v], and the tier's dims of q and k."""
        _check_tier_attend(attend)
        runs, d = self.head_layout.runs, self.head_dim
        v_tiers = self.head_layout.split(self.tier_v_proj(x), [d - r.v for r in runs])
        if attend is causal_attend:
            outs = [tiered_attention(qc, kc, v, torch.cat([qc, qt], -1), torch.cat([kc, kt], -1),
                                     torch.cat([v, vt], -1), *self.tier, self.scale)  # [B, T, n * group, d]
                    for qc, kc, v, qt, kt, vt in zip(q_comp, k_comp, vs, q_tier, k_tier, v_tiers)]
            kept = [o[..., : r.v] for o, r in zip(outs, runs)]
            rest = [o[..., r.v:] for o, r in zip(outs, runs)]
        else:  # the tier store: one row of every head's compressed dims, then one of their tier dims
            lay = self.head_layout
            q_row = torch.cat([lay.queries(q_comp), lay.queries(q_tier)], -1)  # [N, heads, W_k + W_tier_k]
            k_row = torch.cat([lay.rows(k_comp), lay.rows(k_tier)], -1)  # [N, 1, W_k + W_tier_k]
            out = attend(layer, q_row, k_row, torch.cat([lay.rows(vs), lay.rows(v_tiers)], -1), self.scale)
            v_width = sum(r.heads * r.v for r in runs)
            kept = lay.outputs(out[..., :v_width], [r.v for r in runs])
            rest = lay.outputs(out[..., v_width:], [d - r.v for r in runs])
        flat = lambda parts: torch.cat([p.flatten(-2) for p in parts], -1)  # noqa: E731
        return self.o_proj(flat(kept)) + self.tier_o_proj(flat(rest))


def _check_tier_attend(attend: AttendFn) -> None:
    if attend is not causal_attend and not isinstance(attend, PagedAttend):
        raise ValueError("this model keeps a full-rank token tier: it runs the dense forward and the paged "
                         "cache (generate, serve, streaming eval), not KV-cache policies")


def rotate_qk(q: Tensor, k: Tensor, q_basis: Tensor, k_basis: Tensor) -> tuple[Tensor, Tensor]:
    """Rotate mode: post-RoPE q, k onto their KV head's bases.

    q: [*P, heads, d]; k: [*P, kv_heads, d]; q_basis, k_basis: [kv_heads, d, r] -> q [*P, heads, r], k [*P, kv, r]
    """
    kv = k_basis.shape[0]
    q = torch.einsum("...gjd,gdr->...gjr", q.unflatten(-2, (kv, -1)), q_basis).flatten(-3, -2)
    return q, torch.einsum("...gd,gdr->...gr", k, k_basis)


class PagedAttend:
    """Attention through a paged cache (an AttendFn): write the step's K/V into their slots, or hand them to
    the cache's store (a KV policy's form, a token tier), then attend over each sequence's context."""

    def __init__(self, cache: PagedKVCache, batch: PagedBatch):
        self.cache, self.batch = cache, batch

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        # q: [N, heads, dq]; k: [N, kv_heads, dq]; v: [N, kv_heads, dv] -> [N, heads, dv]
        cache, batch = self.cache, self.batch
        cache.write(layer, batch.slot_mapping, k, v)
        if cache.store is not None:
            return cache.store.attend(layer, q, batch, scale)
        k_cache, v_cache = cache.layer(layer)
        return paged_attention(q, k_cache, v_cache, batch.block_tables, batch.seq_lens, batch.query_start_loc,
                               scale=scale)

    def attend_heads(self, layer: int, heads: HeadLayout, qs: list[Tensor], ks: list[Tensor], vs: list[Tensor],
                     scale: float) -> list[Tensor]:
        """A layer with per-KV-head ranks (zeroc/head_ranks.py): per run q [N, n * group, w], k [N, n, w],
        v [N, n, v] -> per run [N, n * group, v]. The cache row holds every head's dims side by side."""
        cache, batch = self.cache, self.batch
        cache.write(layer, batch.slot_mapping, heads.rows(ks), heads.rows(vs))
        if cache.store is not None:
            return heads.outputs(cache.store.attend(layer, heads.queries(qs), batch, scale), [v.shape[-1] for v in vs])
        k_pool, v_pool = cache.layer(layer)
        k_views = heads.pool_views(k_pool, [k.shape[-1] for k in ks])
        v_views = heads.pool_views(v_pool, [v.shape[-1] for v in vs])
        return [paged_attention(q, kc, vc, batch.block_tables, batch.seq_lens, batch.query_start_loc, scale=scale)
                for q, kc, vc in zip(qs, k_views, v_views)]


class FusedPagedAttend:
    """Attention through a plain paged cache whose QKV epilogue is one Triton kernel per layer: RoPE on
    q and k (kept pairs in fold mode; every pair, then the KV head's bases in rotate mode), K and V
    written straight into their cache slots, then the paged attention kernels. The CUDA path of
    `Transformer.forward_paged`; `Attention.forward` calls `attend_raw` with q and k before RoPE."""

    def __init__(self, cache: PagedKVCache, batch: PagedBatch):
        self.cache, self.batch = cache, batch

    def attend_raw(self, layer: int, attn: Attention, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        # q: [N, heads, w]; k: [N, kv_heads, w] before RoPE (w = head_dim in rotate mode, else qk_dim);
        # v: [N, kv_heads, v_dim]; positions: [N] -> [N, heads, v_dim]
        from zeroc_kernels.qkv_epilogue import qkv_epilogue, qkv_rotate_epilogue

        k_pool, v_pool = self.cache.layer(layer)
        slots = self.batch.slot_mapping
        if attn.rotate:
            q = qkv_rotate_epilogue(q, k, v, positions, attn.inv_freq, attn.q_basis, attn.k_basis, slots,
                                    k_pool, v_pool)
        else:  # the kernel reads one frequency row per KV head; an uncompressed layer shares one row
            inv_freq = attn.inv_freq.expand(attn.n_kv, -1)  # [kv_heads, qk_dim / 2]
            q = qkv_epilogue(q, k, v, positions, inv_freq, slots, k_pool, v_pool)
        return paged_attention(q, k_pool, v_pool, self.batch.block_tables, self.batch.seq_lens,
                               self.batch.query_start_loc, scale=attn.scale)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        bias = cfg.mlp_bias
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.index = index
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, index)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, positions: Tensor, attend: AttendFn | FusedPagedAttend) -> Tensor:
        h = x + self.self_attn(self.index, self.input_layernorm(x), positions, attend)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    """LlamaForCausalLM-compatible module (state dict keys match Hugging Face's)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def init_rope(self) -> None:
        """Recompute the RoPE buffers (not in checkpoints) on the weights' device."""
        device = self.lm_head.weight.device
        for i, layer in enumerate(self.model.layers):
            layer.self_attn.inv_freq = layer_inv_freq(self.config, i).to(device)
            if hasattr(layer.self_attn, "tier_inv_freq"):
                layer.self_attn.tier_inv_freq = tier_inv_freq(self.config, i).to(device)

    def _run(self, tokens: Tensor, positions: Tensor, attend: AttendFn | FusedPagedAttend) -> Tensor:
        # tokens, positions: [*P] -> final hidden states [*P, hidden]
        x = self.model.embed_tokens(tokens)
        for layer in self.model.layers:
            x = layer(x, positions, attend)
        return self.model.norm(x)

    def forward(self, tokens: Tensor) -> Tensor:
        """Dense causal forward. tokens: [B, T] -> logits [B, T, vocab]."""
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        return self.lm_head(self._run(tokens, positions, causal_attend))

    def forward_attend(self, tokens: Tensor, positions: Tensor, attend: AttendFn) -> Tensor:
        """Forward with a caller-supplied attention (KV-cache policies). tokens, positions: [*P] -> logits [*P, vocab]."""
        return self.lm_head(self._run(tokens, positions, attend))

    def forward_paged(
        self,
        tokens: Tensor,  # [N] new tokens of all sequences, concatenated
        positions: Tensor,  # [N] absolute position of each token in its sequence
        batch: PagedBatch,
        cache: PagedKVCache,
        logits_indices: Tensor | None = None,  # [M] rows of N to project to logits; None = all
        fused: bool | None = None,
    ) -> Tensor:
        """Ragged prefill/decode through the paged cache -> logits [M, vocab].

        fused: run the QKV epilogue kernels (`FusedPagedAttend`); None = on CUDA with triton, for plain
        caches (a KV policy's store encodes K/V itself). Tests force it on the CPU under TRITON_INTERPRET."""
        if self.config.has_tier:
            from zeroc.tier_store import TierStore  # here: it imports the serving policies, which import us

            if not isinstance(cache.store, TierStore):
                raise ValueError("this model keeps a token tier, whose rows live in its cache's store: build the "
                                 "PagedKVCache with model=")
        if fused is None:
            fused = cache.store is None and use_triton(tokens)
        if fused:
            if cache.store is not None:
                raise ValueError("the fused QKV epilogue writes plain cache slots; this cache has a KV policy")
            hidden = self._run(tokens, positions, FusedPagedAttend(cache, batch))
            return self.lm_head(hidden if logits_indices is None else hidden[logits_indices])

        hidden = self._run(tokens, positions, PagedAttend(cache, batch))
        return self.lm_head(hidden if logits_indices is None else hidden[logits_indices])
