"""Layer-by-layer calibration: the same statistics as the whole-model pass, a local sensitivity that tracks the
full KL, bounded KL passes, and a checkpoint an interrupted calibration resumes from with the same result."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from zeroc.compression.calibrate import ZeroCMethod, collect_statistics, compress, compute_factors, _windows
from zeroc.compression.layerwise import (bisection_order, full_kl_passes, measure_any, measure_local,
                                         resolve_sensitivity, scales)
from zeroc.config import BUNDLED_CALIB
from zeroc.data import read_eval_tokens

SMALL = dict(rank_multiple=8, calib_tokens=512, sensitivity_tokens=256, window=128, ablation_tokens=128,
             sensitivity="local")


@pytest.fixture(scope="module")
def local(random_gqa):
    return measure_local(random_gqa, BUNDLED_CALIB, ZeroCMethod(**SMALL), progress=False)


def test_layer_by_layer_factors_equal_the_whole_model_pass(random_gqa, local):
    method = ZeroCMethod(**SMALL)
    tokens = read_eval_tokens(random_gqa.tokenizer, BUNDLED_CALIB)
    stats = collect_statistics(random_gqa.model, _windows(tokens, method.window, method.calib_tokens),
                               progress=False, sample_tokens=method.ablation_tokens)
    for ours, theirs in zip(local.factors, compute_factors(random_gqa.model, stats)):
        assert torch.equal(ours.pair_order, theirs.pair_order)
        for name in ("v_down", "v_up", "q_basis", "k_basis"):
            torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), atol=1e-5, rtol=1e-4)


def test_local_allocation_is_about_as_good_as_the_full_kl_one(random_gqa, local):
    """The same cuts are costed, smaller ranks cost more, and the layouts each sensitivity allocates lose about
    as much (KL of the compressed model on the sensitivity windows) at two budgets."""
    full = measure_any(random_gqa, BUNDLED_CALIB, ZeroCMethod(**{**SMALL, "sensitivity": "kl"}), progress=False)
    assert sorted(full.deltas) == sorted(local.deltas)
    for (i, kind, r, g), cost in local.deltas.items():
        if r > 8:
            assert cost <= local.deltas[(i, kind, r - 8, g)] * 1.05
    for budget in (0.5, 0.375):
        method = ZeroCMethod(**{**SMALL, "budget": budget})
        _, ours = compress(random_gqa, local, method)
        _, theirs = compress(random_gqa, full, replace(method, sensitivity="kl"))
        print(budget, ours.measured_kl, theirs.measured_kl)
        assert ours.kv_fraction <= budget
        assert ours.measured_kl <= 1.5 * theirs.measured_kl + 1e-4


def test_interrupted_calibration_resumes_to_the_same_result(random_gqa, local, tmp_path):
    method = ZeroCMethod(**SMALL)
    ckpt = tmp_path / "calib.ckpt"

    def stop_after_first(i):
        if i == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        measure_local(random_gqa, BUNDLED_CALIB, method, progress=False, checkpoint=ckpt, on_layer=stop_after_first)
    assert ckpt.is_file()
    seen = []
    resumed = measure_local(random_gqa, BUNDLED_CALIB, method, progress=False, checkpoint=ckpt, on_layer=seen.append)
    assert seen == [1, 2]  # layer 0 came from the checkpoint
    assert resumed.deltas == local.deltas
    a, _ = compress(random_gqa, resumed, replace(method, budget=0.5))
    b, _ = compress(random_gqa, local, replace(method, budget=0.5))
    assert a.config.compression == b.config.compression


def test_max_passes_bounds_the_kl_passes(random_gqa, local):
    capped = measure_local(random_gqa, BUNDLED_CALIB, ZeroCMethod(**SMALL, max_passes=2), progress=False)
    # layer 0 measured (its qk and v passes), the others borrow its scales: the ratio of their costs is that of
    # their local errors, so layer 0's costs match the uncapped run's and the others differ
    for key, cost in capped.deltas.items():
        if key[0] == 0:
            assert cost == pytest.approx(local.deltas[key])
    assert any(cost != pytest.approx(local.deltas[k]) for k, cost in capped.deltas.items() if k[0] == 2)


def test_scales_borrow_the_nearest_measured_layer():
    state = {"kl": {(0, "qk"): 2.0, (4, "qk"): 8.0}, "ref_local": {(i, k): 1.0 for i in range(5) for k in ("qk", "v")}}
    s = scales(state, 5)
    assert [s[(i, "qk")] for i in range(5)] == [2.0, 2.0, 2.0, 8.0, 8.0]
    assert all(s[(i, "v")] == 1.0 for i in range(5))  # none measured: unscaled


def test_bisection_order_spreads_any_prefix():
    assert bisection_order(8)[:3] == [0, 7, 3]
    assert sorted(bisection_order(13)) == list(range(13))


def test_auto_sensitivity_switches_on_the_pass_count(random_gqa):
    cfg = random_gqa.config
    method = ZeroCMethod(**{**SMALL, "sensitivity": "auto"})
    need = full_kl_passes(cfg, method)
    assert need == 3 * 2 * 3 * 3  # layers x KV heads x (fold, rotate, v) x ranks 8, 16, 24
    assert resolve_sensitivity(cfg, method) == "kl"
    assert resolve_sensitivity(cfg, replace(method, max_passes=need - 1)) == "local"
    with pytest.raises(ValueError, match="max_passes"):
        measure_any(random_gqa, BUNDLED_CALIB, replace(method, sensitivity="kl", max_passes=10), progress=False)


def test_calibrate_command_runs_local_with_a_checkpoint(random_gqa_dir, tmp_path, capsys):
    from cli_runs import zeroc_here
    from zeroc.loader import load_model

    ckpt, out = tmp_path / "c.ckpt", tmp_path / "out"
    r = zeroc_here(capsys, "calibrate", "--model", str(random_gqa_dir), "--budget", "0.5", "--out", str(out),
                   "--sensitivity", "local", "--max-passes", "2", "--checkpoint", str(ckpt), "--tokens", "512",
                   "--sensitivity-tokens", "256", "--window", "128", "--ablation-tokens", "128", "--rank-multiple",
                   "8", "--device", "cpu", "--json")
    assert r.returncode == 0, r.stderr
    assert ckpt.is_file() and json.loads(r.stdout)["kv_fraction"] <= 0.5
    assert load_model(out).config.compression.budget == 0.5
