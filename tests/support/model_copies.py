"""Copies of the session's shared models for tests that look at a model's structure."""

from __future__ import annotations

import copy

from zeroc.model import Transformer


def unfused_copy(obj):
    """A deep copy of a LoadedModel or Transformer with each layer's projections apart. The shared fixtures' models
    may have been fused by any earlier test's Engine (on the cpu backend, the one they load with, an Engine fuses
    Q/K/V and gate/up); the logits are the same either way, the GEMM count is not."""
    obj = copy.deepcopy(obj)
    model = obj if isinstance(obj, Transformer) else obj.model  # the Transformer, or a LoadedModel's
    for layer in model.model.layers:
        layer.self_attn.qkv = layer.self_attn.o_tier = layer.mlp.gate_up = None
    return obj
