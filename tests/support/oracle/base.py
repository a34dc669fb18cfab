"""The dense per-token KV-policy oracle: the interface and the helpers every oracle policy shares.

A test oracle, independent of the paged cache: an oracle policy decides, token by token, what
each layer keeps of the past in dense per-layer tensors, and the model runs through
`Transformer.forward_attend` (`oracle.streaming`). The product's methods (zeroc/policies) must give
the same logits through the paged cache (tests/zeroc/policies/test_conformance.py); `oracle_of`
(oracle/__init__.py) maps a product method to its oracle.

Byte accounting: the uncompressed reference stores every K/V element in 16 bits (the fp16
serving cache), whatever dtype the evaluation computes in, so quantisation is not flattered by
comparing against fp32.
"""

from __future__ import annotations

import abc

from typing import TYPE_CHECKING

from torch import Tensor

# The oracles' dense attention is the product's arithmetic, so quantised methods round their codes identically on
# both sides; the geometry type is shared too.
from zeroc.policies.eviction_rule import LayerGeometry, attend_dense  # noqa: F401

if TYPE_CHECKING:  # annotations only: the model sits above the policies
    from zeroc.model import Transformer


REFERENCE_BITS = 16  # bits per element of the uncompressed cache the budget is a fraction of


def check_budget(budget: float) -> None:
    if not isinstance(budget, (int, float)) or not 0.0 < budget <= 1.0:
        raise ValueError(f"KV budget must be in (0, 1], got {budget!r}")


def layer_geometry(model: Transformer, layer: int) -> LayerGeometry:
    cfg = model.config
    return LayerGeometry(layer, cfg.num_attention_heads, *cfg.kv_geometry(layer))


class LayerKVCache(abc.ABC):
    """One layer's cache for a batch of B sequences that advance in lockstep (one token a step).

    Called by the streaming evaluator's attend closure (`oracle.streaming`), once per
    layer per token, after the model has computed the new token's q, k, v (RoPE applied).
    """

    @abc.abstractmethod
    def step(self, q: Tensor, k: Tensor, v: Tensor, scale: float, position: int) -> Tensor:
        """Store the new token's k/v as the policy says and attend over what is kept.

        q: [B, heads, k_dim]; k: [B, kv_heads, k_dim]; v: [B, kv_heads, v_dim];
        position: index of the new token in the sequence (same for the whole batch)
        -> attention output [B, heads, v_dim]
        """

    @abc.abstractmethod
    def stored_bits(self) -> float:
        """Bits this cache holds now (per sequence, summed over KV heads), metadata included."""


class KVPolicy(abc.ABC):
    """A KV-cache policy. Subclasses are frozen dataclasses whose fields are hyperparameters.

    Who calls what:
    - `__post_init__` (dataclass construction): validates the hyperparameters, ValueError if bad.
    - `prepare(model)`: the streaming evaluator, once per model before any sequence; checks the
      model suits the policy and fits what the policy needs from the weights (e.g. bases).
    - `new_cache(model, layer, batch)`: the streaming evaluator, once per layer for each group
      of sequences; the returned `LayerKVCache` then receives every token of that group.
    - `label`: reports and tables.
    """

    name: str = "policy"
    budget: float

    def prepare(self, model: Transformer) -> None:
        """Fit whatever the policy needs from `model` (default: nothing)."""

    @abc.abstractmethod
    def new_cache(self, model: Transformer, layer: int, batch: int) -> LayerKVCache:
        """An empty cache for `layer` and `batch` sequences."""

    @property
    def label(self) -> str:
        return self.name


def full_bits(geom: LayerGeometry, tokens: int) -> float:
    """Bits of the uncompressed cache of one layer holding `tokens` tokens (one sequence)."""
    return float(tokens * geom.kv_heads * (geom.k_dim + geom.v_dim) * REFERENCE_BITS)


def reference_bits(model: Transformer, tokens: int) -> float:
    """Bits of the uncompressed fp16 cache of every layer holding `tokens` tokens (one sequence), at the
    source model's head_dim even when `model` is ZeroC-compressed: the denominator of every KV fraction."""
    cfg = model.config
    return float(tokens * cfg.num_hidden_layers * cfg.num_key_value_heads * 2 * cfg.head_dim * REFERENCE_BITS)
