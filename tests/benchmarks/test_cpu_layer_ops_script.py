"""The C++ norms-and-RoPE benchmark runs end to end, and its eager side really runs the references: a backend copy
whose norms and RoPE are the base class's, computing logits close to the C++ side's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "cpu_layer_ops.py"


def test_the_eager_side_runs_the_references(random_gqa, cpu_kernel, monkeypatch):
    import copy

    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # the script imports its sibling fused_projections.py
    import cpu_layer_ops as bench

    from zeroc_kernels.attention import AttentionBackend, CpuBackend

    model = copy.deepcopy(random_gqa.model)
    model.backend = CpuBackend()
    eager = bench.eager_ops(model.backend)
    assert type(eager) is CpuBackend and eager.kernel is model.backend.kernel
    for name in bench.OPS:
        assert getattr(eager, name).__func__ is getattr(AttentionBackend, name)
        assert getattr(model.backend, name).__func__ is getattr(CpuBackend, name)
    tokens = torch.randint(2, 200, (1, 7))
    with torch.inference_mode():
        fused = model(tokens)
        model.backend = eager
        torch.testing.assert_close(model(tokens), fused, atol=1e-4, rtol=1e-4)


def test_a_short_run_reports_both_sides(tmp_path, cpu_kernel):
    out = tmp_path / "ops.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "--rounds", "1", "--steps", "2", "--batches", "1",
                        "--dtypes", "float32", "--threads", "1", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(out.read_text())["results"]["float32"]
    assert set(results) == {"decode b1", "prefill 1024"}
    assert all(ms["eager"] > 0 and ms["c++"] > 0 for ms in results.values())
    assert "c++/eager" in r.stdout
