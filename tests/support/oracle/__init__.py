"""Dense per-token oracles of the KV methods (test support; nothing in the product imports them)."""

from __future__ import annotations

from oracle.base import KVPolicy
from oracle.eviction import Eviction
from oracle.int8 import Int8 as DenseInt8
from oracle.kivi import KIVI as DenseKIVI
from oracle.palu import PaluLowRank
from zeroc.policies.base import KVMethod
from zeroc.policies.eviction import EvictionMethod
from zeroc.policies.int8 import Int8
from zeroc.policies.kivi import KIVI
from zeroc.policies.palu import Palu


def oracle_of(method: KVMethod) -> KVPolicy:
    """The dense oracle policy that must give `method`'s logits."""
    if isinstance(method, EvictionMethod):
        return Eviction(method)
    if isinstance(method, KIVI):
        return DenseKIVI(bits=method.bits, group=method.group, residual=method.residual)
    if isinstance(method, Palu):
        return PaluLowRank(budget=method.budget)
    if isinstance(method, Int8):
        return DenseInt8(budget=method.budget)
    raise ValueError(f"no dense oracle for {method.label}")
