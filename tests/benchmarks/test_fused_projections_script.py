"""The fused-projections benchmark runs end to end on a small batch, and switching its model between the
fused and separate GEMMs changes no logit."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "fused_projections.py"
_spec = importlib.util.spec_from_file_location("fused_projections", SCRIPT)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_both_sides_compute_the_same_logits(random_gqa):
    import copy

    model = copy.deepcopy(random_gqa.model)
    model.fuse_projections()
    saved = [(layer.self_attn.qkv, layer.mlp.gate_up) for layer in model.model.layers]
    tokens = torch.randint(2, 200, (1, 7))
    backends = {True: model.backend, False: bench._separate(model.backend)}
    assert backends[False].fuses_projections is False and type(backends[False]) is type(model.backend)
    logits = []
    with torch.inference_mode():
        for on in (False, True):
            bench._fused(model, on, saved, backends)
            assert (model.model.layers[0].self_attn.qkv is not None) == on
            assert model.backend.fuses_projections == (on and type(model.backend).fuses_projections)
            logits.append(model(tokens))
    torch.testing.assert_close(logits[0], logits[1])


def test_a_short_run_reports_both_sides():
    r = subprocess.run([sys.executable, str(SCRIPT), "--rounds", "1", "--batch", "4", "--threads", "1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["separate", "fused"]
    assert all(float(line.split()[3]) > 0 and float(line.split()[7]) > 0 for line in lines)
