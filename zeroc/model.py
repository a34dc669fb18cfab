"""A Llama-family transformer: RMSNorm, RoPE, GQA attention, SwiGLU.

Two ways through the same weights:
- `Transformer.forward(tokens)` attends densely with a causal mask ([B, T] in, logits out):
  training and full-pass evaluation.
- `Transformer.forward_paged(tokens, positions, batch, cache)` takes a flat ragged batch of
  new tokens, writes their K/V into the paged cache and attends over each sequence's cached
  context: prefill, decode and mixed continuous-batching steps. Its attention backend
  (`Transformer.backend`, chosen at load: zeroc_kernels.attention) runs the kernels; a backend with a
  fused epilogue (Triton) gets q and k before RoPE (`FusedPagedAttend`): one kernel applies RoPE (and
  rotate mode's bases) and writes K/V into their cache slots (kernels/qkv_epilogue.py). Either way K/V
  enter the cache through its KV-write seam (zeroc/kv_cache.py), which is what its listeners see.
- `Transformer.forward_attend(tokens, positions, attend)` lets the caller own attention and the
  cache (the KV-cache policies of `zeroc.policies`).
How each forward attends is one object (zeroc/attend.py), not a dispatch in the layers. Each layer's norms and
SwiGLU gate go through the model's backend (one kernel each on triton), so do its GEMMs (`Linear`, zeroc/layers.py:
oneDNN on the cpu backend), and an Engine on a backend that
`fuses_projections` runs Q/K/V and gate/up as one GEMM each (`fuse_projections`, zeroc/fused_linears.py).
A compressed model with a full-rank token tier (zeroc/tier.py) runs the dense causal forward and
the paged one (its cache holds the tier: zeroc/policies/tier.py), not the KV-cache policies.
Weight names follow Hugging Face's LlamaForCausalLM so checkpoints load without renaming.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from zeroc.attend import Attend, AttendFn, CallerAttend, DenseCausal, FusedPagedAttend, PagedAttend
from zeroc.config import ModelConfig
from zeroc.fused_linears import FusedLinears, SummedLinears, plain_weight, release_gemms, restore_gemms
from zeroc.head_ranks import HeadLayout
from zeroc.kv_cache import PagedBatch, PagedKVCache
from zeroc.layers import Embedding, Linear, RMSNorm
from zeroc.rope import RopeTables, layer_inv_freq, rope_attention_factor, tier_inv_freq
from zeroc_kernels.attention import AttentionBackend, TorchBackend
from zeroc_kernels.layer_ops import silu_mul_ref


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
        group, d, bias = cfg.group_size, cfg.head_dim, cfg.attention_bias or cfg.qkv_bias
        self.head_dim = d
        qk, vr = cfg.head_ranks(layer)  # per KV head
        # per-KV-head ranks: runs of heads with equal ranks (zeroc/head_ranks.py); None: one width for all
        self.head_layout = HeadLayout.of(qk, vr, group) if cfg.per_head_ranks(layer) else None
        self.qk_dim, self.v_dim = (None, None) if self.head_layout else (qk[0], vr[0])
        self.rotate = cfg.qk_mode(layer) == "rotate"
        proj = (d,) * self.n_kv if self.rotate else qk  # rotate: RoPE needs every pair
        # the model was trained with this, whatever the rank; yarn's factor scales cos and sin, so q.k by its square
        self.scale = rope_attention_factor(cfg.rope) ** 2 / math.sqrt(d)
        self.q_proj = Linear(cfg.hidden_size, group * sum(proj), bias=bias)
        self.k_proj = Linear(cfg.hidden_size, sum(proj), bias=bias)
        self.v_proj = Linear(cfg.hidden_size, sum(vr), bias=bias)
        self.o_proj = Linear(group * sum(vr), cfg.hidden_size, bias=cfg.attention_bias)
        # Q, K and V (and a tier's projections of the input: `input_projections`) as one GEMM, and a tier's two
        # output projections as one, once `Transformer.fuse_projections` ran
        self.qkv: FusedLinears | None = None
        self.o_tier: SummedLinears | None = None
        if self.rotate:  # q' = q_basis[g]^T RoPE(q) for every query head of group g; k' likewise
            # [kv, d, r]; with per-head ranks r = the widest, and head g's columns past its rank are zero
            self.q_basis = nn.Parameter(torch.empty(self.n_kv, d, max(qk)))
            self.k_basis = nn.Parameter(torch.empty(self.n_kv, d, max(qk)))
        self.register_buffer("inv_freq", layer_inv_freq(cfg, layer).to(torch.get_default_device()), persistent=False)
        # What names this layer's RoPE frequencies in a forward's shared `RopeTables`: every pair, or the
        # pairs fold mode keeps per KV head (equal across layers that keep the same ones).
        self.rope_key = ("fold", cfg.compression.layers[layer].qk_pairs) if cfg.qk_mode(layer) == "fold" else ("all",)
        self.tier = (cfg.compression.sinks, cfg.compression.recent) if cfg.has_tier else None
        if self.tier is not None:
            tier_qk, tier_v = [d - r for r in qk], [d - r for r in vr]  # per KV head
            if self.rotate:  # the bases' complement columns: [kv, d, d - r] each (zero-padded past a head's)
                self.tier_q_basis = nn.Parameter(torch.empty(self.n_kv, d, max(tier_qk)))
                self.tier_k_basis = nn.Parameter(torch.empty(self.n_kv, d, max(tier_qk)))
            else:
                self.tier_q_proj = Linear(cfg.hidden_size, group * sum(tier_qk), bias=bias)
                self.tier_k_proj = Linear(cfg.hidden_size, sum(tier_qk), bias=bias)
                self.register_buffer("tier_inv_freq", tier_inv_freq(cfg, layer).to(torch.get_default_device()),
                                     persistent=False)
            self.tier_v_proj = Linear(cfg.hidden_size, sum(tier_v), bias=bias)
            self.tier_o_proj = Linear(group * sum(tier_v), cfg.hidden_size, bias=False)  # o_proj has the bias

    def input_projections(self) -> tuple[nn.Linear, ...]:
        """The layer's projections of its input, in the order `_project` returns their outputs: Q, K, V, then a
        tier's (fold: the dropped RoPE pairs' Q and K rows; rotate: none, the bases' complement gives them),
        then the tier's V complement."""
        if self.tier is None:
            return self.q_proj, self.k_proj, self.v_proj
        tier_qk = () if self.rotate else (self.tier_q_proj, self.tier_k_proj)
        return self.q_proj, self.k_proj, self.v_proj, *tier_qk, self.tier_v_proj

    def _project(self, x: Tensor) -> tuple[Tensor, ...]:
        # x: [*P, hidden] -> each of `input_projections`' outputs [*P, out_i]: one GEMM once fused
        return self.qkv(x) if self.qkv is not None else tuple(p(x) for p in self.input_projections())

    def _tier_out(self, kept: Tensor, rest: Tensor) -> Tensor:
        # kept: [*P, Σ v dims] through o_proj, rest: [*P, Σ tier v dims] through tier_o_proj -> [*P, hidden]
        return self.o_tier(kept, rest) if self.o_tier is not None else self.o_proj(kept) + self.tier_o_proj(rest)

    def forward(self, layer: int, x: Tensor, rope: RopeTables, attend: Attend) -> Tensor:
        # x: [*P, hidden]; rope: the forward's positions [*P] and their cos/sin tables
        lead = x.shape[:-1]
        q, k, v, *tier = self._project(x)  # [*P, out] each; tier: the tier's projections (`input_projections`)
        if self.head_layout is not None:
            return self._per_head(layer, lead, (q, k, v), tier, rope, attend)
        q = q.view(*lead, self.n_heads, -1)
        k = k.view(*lead, self.n_kv, -1)
        v = v.view(*lead, self.n_kv, self.v_dim)
        if attend.fuses_rope and self.tier is None:  # RoPE and the bases run inside its epilogue kernel
            return self.o_proj(attend.raw(layer, self, q, k, v, rope.positions).reshape(*lead, -1))
        if self.tier is not None:
            return self._tiered(layer, lead, rope, (q, k, v), tier, attend)
        q, k = rope.qk(self.rope_key, q, k, self.inv_freq)  # [*P, heads, qk_dim or d], [*P, kv_heads, qk_dim or d]
        if self.rotate:
            q, k = rotate_qk(q, k, self.q_basis, self.k_basis)
        out = attend(layer, q, k, v, self.scale)  # [*P, heads, v_dim]
        return self.o_proj(out.reshape(*lead, -1))

    def _tiered(self, layer: int, lead: torch.Size, rope: RopeTables, qkv: tuple[Tensor, Tensor, Tensor],
                tier: list[Tensor], attend: Attend) -> Tensor:
        """Attention with the token tier (zeroc/tier.py): dense causal, or through a tier cache's pools.
        lead: *P; rope: the forward's positions [*P] and cos/sin; qkv: q [*P, heads, *] and k [*P, kv_heads, *]
        before RoPE, v [*P, kv_heads, v_dim]; tier: the tier's projections of x, [*P, out_i] each."""
        q, k, v = qkv
        v_tier = tier[-1].view(*lead, self.n_kv, -1)
        # Full-rank q, k: the compressed dims, then the complement (q·k sums over both): fold, the dropped
        # RoPE pairs; rotate, the post-RoPE q, k on the bases' complement columns (A B^T = I at full rank).
        if self.rotate:
            q, k = rope.qk(self.rope_key, q, k, self.inv_freq)  # [*P, heads, d], [*P, kv_heads, d]
            q_tier, k_tier = rotate_qk(q, k, self.tier_q_basis, self.tier_k_basis)
            q, k = rotate_qk(q, k, self.q_basis, self.k_basis)
            q_full, k_full, v_full = torch.cat([q, q_tier], -1), torch.cat([k, k_tier], -1), torch.cat([v, v_tier], -1)
        else:
            q_tier, k_tier = tier[0].view(*lead, self.n_heads, -1), tier[1].view(*lead, self.n_kv, -1)
            q_full, k_full, v_full = rope.tier_qkv((self.rope_key, ("tier", *self.rope_key)), (q, k, v),
                                                   (q_tier, k_tier, v_tier), self.inv_freq, self.tier_inv_freq)
            q, k = q_full[..., : self.qk_dim], k_full[..., : self.qk_dim]  # the compressed dims after RoPE
        out = attend.tiered(layer, (q, k, v), (q_full, k_full, v_full), self.tier, self.scale)  # [*P, heads, d]
        out_kept, out_rest = out.split([self.v_dim, out.shape[-1] - self.v_dim], -1)
        return self._tier_out(out_kept.reshape(*lead, -1), out_rest.reshape(*lead, -1))

    def _per_head(self, layer: int, lead: torch.Size, qkv: tuple[Tensor, Tensor, Tensor], tier: list[Tensor],
                  rope: RopeTables, attend: Attend) -> Tensor:
        """A layer whose KV heads keep different ranks: every run of equal-rank heads is a GQA block of its own
        widths (zeroc/head_ranks.py). lead: *P; qkv and tier: `_project`'s outputs, [*P, out_i] each; rope: the
        forward's positions [*P] and cos/sin"""
        lay, (q, k, v) = self.head_layout, qkv
        runs = lay.runs
        vs = lay.split(v, [r.v for r in runs])  # per run [*P, n, v]
        tiers = None  # per run the tier's q, k dims: fold, the dropped pairs; rotate, the complement columns
        if self.rotate:  # every head is d wide through RoPE: project and rotate once, at the widest rank
            q, k = rope.qk(self.rope_key, q.view(*lead, self.n_heads, self.head_dim),
                           k.view(*lead, self.n_kv, self.head_dim), self.inv_freq)
            qs, ks = lay.narrow(*rotate_qk(q, k, self.q_basis, self.k_basis), [r.qk for r in runs])
            if self.tier is not None:
                tiers = lay.narrow(*rotate_qk(q, k, self.tier_q_basis, self.tier_k_basis),
                                   [self.head_dim - r.qk for r in runs])
        else:  # fold: each head's own kept pairs, RoPE at their own frequencies
            qs, ks = self._fold_runs(q, k, rope, self.rope_key, self.inv_freq, [r.qk for r in runs])
            if self.tier is not None:
                tiers = self._fold_runs(tier[0], tier[1], rope, ("tier", *self.rope_key), self.tier_inv_freq,
                                        [self.head_dim - r.qk for r in runs])
        if tiers is not None:
            return self._per_head_tiered(layer, (qs, ks, vs), (*tiers, tier[-1]), attend)
        outs = attend.runs(layer, lay, qs, ks, vs, self.scale)  # per run [*P, n * group, v]
        return self.o_proj(torch.cat([o.flatten(-2) for o in outs], -1))

    def _fold_runs(self, q: Tensor, k: Tensor, rope: RopeTables, key: tuple, inv_freq: Tensor,
                   widths: list[int]) -> tuple[list[Tensor], list[Tensor]]:
        """Fold mode's per-run q [*P, n * group, w] and k [*P, n, w] after RoPE, from projections q [*P, heads' dims]
        and k [*P, KV heads' dims]; inv_freq: [kv, widest / 2]."""
        qs = self.head_layout.split(q, widths, queries=True)
        ks = self.head_layout.split(k, widths)
        for i, (r, w) in enumerate(zip(self.head_layout.runs, widths)):
            qs[i], ks[i] = rope.qk((*key, r.start, r.stop, w), qs[i], ks[i], inv_freq[r.start: r.stop, : w // 2])
        return qs, ks

    def _per_head_tiered(self, layer: int, comp: tuple[list[Tensor], list[Tensor], list[Tensor]],
                         tier: tuple[list[Tensor], list[Tensor], Tensor], attend: Attend) -> Tensor:
        """`_tiered` for a layer with per-KV-head ranks. comp, per run: q [*P, n * group, r] and k [*P, n, r]
        compressed after RoPE (and the bases), v [*P, n, v]; tier: per run the tier's dims of q and k, then the
        V complement's projection [*P, Σ tier v dims]."""
        runs, d = self.head_layout.runs, self.head_dim
        v_tiers = self.head_layout.split(tier[2], [d - r.v for r in runs])
        kept, rest = attend.tiered_runs(layer, self.head_layout, comp, (*tier[:2], v_tiers), self.tier, self.scale)
        flat = lambda parts: torch.cat([p.flatten(-2) for p in parts], -1)  # noqa: E731
        return self._tier_out(flat(kept), flat(rest))


def rotate_qk(q: Tensor, k: Tensor, q_basis: Tensor, k_basis: Tensor) -> tuple[Tensor, Tensor]:
    """Rotate mode: post-RoPE q, k onto their KV head's bases.

    q: [*P, heads, d]; k: [*P, kv_heads, d]; q_basis, k_basis: [kv_heads, d, r] -> q [*P, heads, r], k [*P, kv, r]
    """
    kv = k_basis.shape[0]
    q = torch.einsum("...gjd,gdr->...gjr", q.unflatten(-2, (kv, -1)), q_basis).flatten(-3, -2)
    return q, torch.einsum("...gd,gdr->...gr", k, k_basis)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        bias = cfg.mlp_bias
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=bias)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=bias)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=bias)
        self.gate_up: FusedLinears | None = None  # gate and up as one GEMM, once fused

    def forward(self, x: Tensor, ops: AttentionBackend | None = None) -> Tensor:
        # x: [*, hidden] -> [*, hidden]; ops as in RMSNorm.forward. Without ops (a compiled feed-forward, whose
        # graph the fused GEMM's weight check would break) the references, and the two GEMMs.
        fused = self.gate_up is not None and ops is not None
        gate, up = self.gate_up(x) if fused else (self.gate_proj(x), self.up_proj(x))  # [*, intermediate] each
        return self.down_proj(ops.silu_mul(gate, up) if ops is not None else silu_mul_ref(gate, up))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.index = index
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, index)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, rope: RopeTables, attend: Attend, ops: AttentionBackend | None = None) -> Tensor:
        """x: [*P, hidden] -> [*P, hidden], one layer alone (calibration runs them so). ops: the backend for the
        norms and the gate (None: the references)."""
        out, residual = self.forward_residual(x, None, rope, attend, ops)
        return out + residual

    def forward_residual(self, x: Tensor, residual: Tensor | None, rope: RopeTables, attend: Attend,
                         ops: AttentionBackend | None = None) -> tuple[Tensor, Tensor]:
        """The layer on a residual stream kept apart, as vLLM's layers run, so each residual add is fused into
        the norm that reads its sum (ops.add_rms_norm). The layer's input is x + residual (residual None: x
        alone, the first layer). x, residual: [*P, hidden] -> (MLP output, residual), whose sum is its output.
        The sums are the unfused layer's, in its order: the same numbers on every backend's references."""
        if residual is None:
            normed, residual = self.input_layernorm(x, ops), x
        else:
            normed, residual = self.input_layernorm.add(x, residual, ops)
        return self.feed_forward(self.self_attn(self.index, normed, rope, attend), residual, ops)

    def with_attention(self, attn: Attention) -> DecoderLayer:
        """This layer with `attn` in its attention's place, sharing its norms and MLP (and their packed weights):
        calibration runs a cut layer so, the source model untouched."""
        new = copy.copy(self)
        new._modules = {**self._modules, "self_attn": attn}
        return new

    def feed_forward(self, a: Tensor, residual: Tensor, ops: AttentionBackend | None = None) -> tuple[Tensor, Tensor]:
        """(MLP(norm(a + residual)), a + residual). a (attention's output), residual: [*, hidden]. What
        `compile_feed_forward` hands to torch.compile."""
        normed, residual = self.post_attention_layernorm.add(a, residual, ops)
        return self.mlp(normed, ops), residual


def compile_feed_forward(model: nn.Module) -> None:
    """torch.compile each layer's norm + MLP, with dynamic shapes so one graph serves every token count.
    Attention stays eager: it calls the backend's paged kernels, which dynamo cannot trace. The compiled
    graph takes the references, whose norm and gate inductor fuses itself. Idempotent."""
    for layer in model.model.layers:
        if "feed_forward" not in vars(layer):  # the instance attribute shadows the method once compiled
            compiled = torch.compile(functools.partial(DecoderLayer.feed_forward, layer), dynamic=True)
            layer.feed_forward = functools.partial(_without_ops, compiled)


def _without_ops(compiled, a: Tensor, residual: Tensor, ops: AttentionBackend | None = None) -> tuple[Tensor, Tensor]:
    """A compiled feed_forward under the layer's call signature: the backend stays out of dynamo's graph."""
    return compiled(a, residual)


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    """LlamaForCausalLM-compatible module (state dict keys match Hugging Face's).

    `backend` runs the paged forward's attention (zeroc_kernels.attention): the PyTorch references unless the
    loader picked another for the model's device (`--attention-backend`)."""

    def __init__(self, cfg: ModelConfig, backend: AttentionBackend | None = None):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.backend = backend or TorchBackend()  # after the Linears: the setter hands them its GEMM

    @property
    def backend(self) -> AttentionBackend:
        return self._backend

    @backend.setter
    def backend(self, backend: AttentionBackend) -> None:
        if "_backend" in vars(self):
            self.restore_plain_weights()  # another backend runs the plain weights
        self._backend = backend
        for module in self.modules():
            if isinstance(module, Linear):
                module.gemm = backend.linear
                module.pack.clear()  # a copy packed for the backend before is no use to this one
        for fused in self._fused():
            fused.pack.clear()

    def _fused(self) -> list[FusedLinears | SummedLinears]:
        """The fused GEMMs `fuse_projections` made (none before it)."""
        layers = self.model.layers
        return [f for layer in layers for f in (layer.self_attn.qkv, layer.self_attn.o_tier, layer.mlp.gate_up)
                if f is not None]

    def prepare_to_serve(self, release: bool = False) -> None:
        """What an Engine and a prefill worker do to their model before sizing a KV cache, so that a prefill service
        runs the GEMMs a colocated engine runs: fuse the projections where the backend runs them fused (before any
        CUDA graph captures them), have the backend lay out the weights (`prepack`), and drop the plain copies of
        those it packed (`release_plain_weights`) if `release` (not where torch.compile traces the plain ones)."""
        if self.backend.fuses_projections:
            self.fuse_projections()
        self.prepack()
        if release:
            self.release_plain_weights()

    def release_plain_weights(self) -> None:
        """Hold each GEMM's weight once: where the backend keeps a weight packed (the cpu backend's oneDNN copies),
        the pack becomes its only copy and the Parameter an empty placeholder, as vLLM's CPU backend drops its
        weights once packed. A tied LM head keeps its weight (the embedding reads it). Forwards without gradients
        run as before, the same bits; `restore_plain_weights` undoes it, and so do setting a backend, moving or
        casting the model, `state_dict`, `load_state_dict` and deep copies (which put the plain weights back
        for their time, then drop them again); `plain_weight` reads one meanwhile."""
        release_gemms(self._gemms(), keep=self.model.embed_tokens.weight)

    def restore_plain_weights(self) -> bool:
        """Undo `release_plain_weights` (the same bits, from the packs). Returns whether any weight was released."""
        return restore_gemms(self._gemms())

    def plain_weight(self, linear: Linear) -> Tensor:
        """linear's weight [out, in] as values (a KV policy fits itself to them): the Parameter, or a copy from the
        pack that holds it where the model released it."""
        return plain_weight(linear, self._fused())

    @contextlib.contextmanager
    def _plain_weights(self):
        """The plain weights for the block's time, released again after it if they were."""
        released = self.restore_plain_weights()
        try:
            yield
        finally:
            if released:  # packed again first where a load changed the weights
                self.prepack()
                self.release_plain_weights()

    def state_dict(self, *args, **kwargs):
        with self._plain_weights():  # a released weight's placeholder is not its value
            return super().state_dict(*args, **kwargs)

    def load_state_dict(self, *args, **kwargs):
        with self._plain_weights():  # loaded into the plain weights, packed again where released
            return super().load_state_dict(*args, **kwargs)

    def __deepcopy__(self, memo: dict) -> Transformer:
        with self._plain_weights():  # the copy holds plain weights, its packs empty until it serves
            new = type(self).__new__(type(self))
            memo[id(self)] = new
            new.__setstate__(copy.deepcopy(self.__dict__, memo))
            return new

    def _apply(self, fn, recurse: bool = True):
        self.restore_plain_weights()  # moved or cast: from the plain weights (the packs are of no use after)
        return super()._apply(fn, recurse)

    def prepack(self) -> None:
        """Have the backend lay out every GEMM's weight now (the cpu backend's packed oneDNN copies), not at its
        first call: the Engine calls it before sizing its KV cache."""
        for gemm in self._gemms():
            self.backend.prepack(gemm.weight, gemm.pack)

    def _gemms(self) -> list[Linear | FusedLinears | SummedLinears]:
        """The GEMMs a forward without gradients runs: the fused ones, and every Linear they do not serve (a part
        of a fused GEMM runs on its own only where gradients are wanted)."""
        fused = self._fused()
        served = {id(p) for f in fused for p in f.parts}
        return [m for m in self.modules() if isinstance(m, Linear) and id(m) not in served] + fused

    def fuse_projections(self) -> None:
        """Run each layer's Q/K/V projections (with a token tier's: `Attention.input_projections`) as one GEMM,
        a tier's two output projections as another, and its gate/up pair as a third (zeroc/fused_linears.py) in
        forwards without gradients: fewer, wider GEMMs per decode step. Weights stay where they are, as views;
        call it once the model is where it will run (the Engine does). Idempotent; a fused GEMM that went stale
        (the model was moved or cast since, so its parts run apart) is fused again."""
        for layer in self.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            if attn.qkv is None or not attn.qkv.fresh:
                attn.qkv = FusedLinears.of(*attn.input_projections())
            if attn.tier is not None and (attn.o_tier is None or not attn.o_tier.fresh):
                attn.o_tier = SummedLinears.of(attn.o_proj, attn.tier_o_proj)
            if mlp.gate_up is None or not mlp.gate_up.fresh:
                mlp.gate_up = FusedLinears.of(mlp.gate_proj, mlp.up_proj)

    def init_rope(self) -> None:
        """Recompute the RoPE buffers (not in checkpoints) on the weights' device."""
        device = self.lm_head.weight.device
        for i, layer in enumerate(self.model.layers):
            layer.self_attn.inv_freq = layer_inv_freq(self.config, i).to(device)
            if hasattr(layer.self_attn, "tier_inv_freq"):
                layer.self_attn.tier_inv_freq = tier_inv_freq(self.config, i).to(device)

    def _run(self, tokens: Tensor, positions: Tensor, attend: Attend) -> Tensor:
        # tokens, positions: [*P] -> final hidden states [*P, hidden]
        return self.run_layers(self.model.embed_tokens(tokens), None, positions, attend, self.model.layers)

    def run_layers(self, x: Tensor, residual: Tensor | None, positions: Tensor, attend: Attend,
                   layers: Iterable[DecoderLayer]) -> Tensor:
        """The forward from `layers` on: x + residual [*P, hidden] enter the first of them (residual None: x alone,
        the embeddings), positions [*P] -> the final normalised hidden states [*P, hidden]. Calibration resumes
        the source model's forward here at a cut layer (`DecoderLayer.with_attention`)."""
        rope = RopeTables(positions, self.backend)  # cos/sin once per forward, shared by the layers (or kernels)
        for layer in layers:
            x, residual = layer.forward_residual(x, residual, rope, attend, self.backend)  # hidden = x + residual
        return self.model.norm.add(x, residual, self.backend)[0]

    def forward(self, tokens: Tensor) -> Tensor:
        """Dense causal forward. tokens: [B, T] -> logits [B, T, vocab]."""
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        return self.lm_head(self._run(tokens, positions, DenseCausal()))

    def forward_attend(self, tokens: Tensor, positions: Tensor, attend: AttendFn | Attend) -> Tensor:
        """Forward with a caller-supplied attention (KV-cache policies, calibration, sequence parallelism).
        tokens, positions: [*P] -> logits [*P, vocab]."""
        attend = attend if isinstance(attend, Attend) else CallerAttend(attend)
        return self.lm_head(self._run(tokens, positions, attend))

    def forward_paged(
        self,
        tokens: Tensor,  # [N] new tokens of all sequences, concatenated
        positions: Tensor,  # [N] absolute position of each token in its sequence
        batch: PagedBatch,
        cache: PagedKVCache,
        logits_indices: Tensor | None = None,  # [M] rows of N to project to logits; None = all
    ) -> Tensor:
        """Ragged prefill/decode through the paged cache -> logits [M, vocab].

        K/V enter the cache through its KV-write seam on every backend: written in PyTorch, or by the
        backend's fused QKV epilogue (`FusedPagedAttend`, plain caches only: a KV policy's pools encodes
        K/V itself), which then tells the cache's listeners."""
        if self.config.has_tier and not cache.keeps_tier:
            raise ValueError("this model keeps a token tier, whose rows live in its cache's pools: build the "
                             "cache with zeroc.caches.paged_cache(..., model=)")
        fused = self.backend.fused_epilogue and cache.pools is None
        attend = (FusedPagedAttend if fused else PagedAttend)(cache, batch, self.backend)
        hidden = self._run(tokens, positions, attend)
        return self.lm_head(hidden if logits_indices is None else hidden[logits_indices])
