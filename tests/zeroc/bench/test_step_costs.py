"""zeroc.bench.step_costs: where a step's device syncs come from, and its ops by time."""

from __future__ import annotations

import torch

from zeroc.bench.step_costs import profile_step


def test_sync_warnings_are_traced_to_the_lines_that_caused_them():
    """On CUDA, count_syncs reads torch's sync-debug warnings; each one is traced to the code that made it,
    so a device run's output alone says where an unexpected sync comes from. Other warnings are not syncs."""
    import warnings

    from zeroc.bench.step_costs import warned_syncs

    def reads_back():
        warnings.warn("called a synchronizing CUDA operation")

    with warned_syncs() as where:
        reads_back()
        warnings.warn("something else")
        reads_back()
    assert len(where) == 2
    line = reads_back.__code__.co_firstlineno + 1
    assert all(w.startswith(f"test_step_costs.py:{line} <- test_step_costs.py:") for w in where), where


def test_a_profiled_step_lists_its_ops_by_time():
    a, b = torch.randn(300, 300), torch.randn(300, 300)
    ops = profile_step(lambda: [a @ b for _ in range(5)] + [a + b], torch.device("cpu"), top=3)
    assert len(ops) == 3 and ops[0]["name"] in ("aten::mm", "aten::matmul") and ops[0]["calls"] == 5
    assert ops[0]["ms"] >= ops[1]["ms"] >= ops[2]["ms"] > 0
