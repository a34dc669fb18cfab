"""`zeroc bench engine` at a tiny shape on the CPU: it runs end to end and its figures are consistent."""

from __future__ import annotations

import json

import pytest
import torch

from zeroc import cli
from zeroc.bench.engine import EngineBenchSpec, base_config, kv_bytes, method_config, parse_method
from zeroc.step_clock import PHASES


def test_the_engine_bench_runs_every_method_interleaved_and_reports_against_its_floor(capsys):
    torch.set_num_threads(1)
    rc = cli.main(["bench", "engine", "--layers", "2", "--batch", "3", "--prompt", "20", "--new", "5",
                   "--rounds", "2", "--methods", "none", "zeroc-fold-32", "zeroc-rotate-16", "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert [(r["round"], r["method"]) for r in report["rows"]] == [
        (r, m) for r in range(2) for m in ("none", "zeroc-fold-32", "zeroc-rotate-16")]
    s = report["summary"]
    for m, row in s.items():
        assert row["prefill_tokens_s"] > 0 and 0 < row["prefill_mfu"]
        assert row["step_ms"] >= row["device_ms"] > 0 and row["step_p90_ms"] >= row["step_ms"]
        assert row["floor_ms"] > 0 and row["step_over_floor"] > 0
        assert row["syncs_per_step"] == 1  # the sampled ids come to the host once
        assert len(row["step_over_none"]) == 2
        phases = row["phases_ms"]  # where a step's wall time goes: every phase laps, and they add up to no more
        assert set(phases) == set(PHASES) and all(ms >= 0 for ms in phases.values()) and phases["forward"] > 0
        # each step's phases lap inside its wall time, so their means add up to no more than the mean step (over two
        # rounds a median is a mean); the median step, which a slow step does not move, can be less
        assert sum(phases.values()) <= row["step_mean_ms"] * 1.001
    assert s["none"]["step_over_none"] == [1.0, 1.0]
    rows = {r["method"]: r for r in report["rows"] if r["round"] == 0}
    # fewer KV dims per token: fold 32 of 64 halves Q/K and V, rotate 16 keeps a quarter
    full = rows["none"]["kv_bytes_per_token"]
    assert rows["zeroc-fold-32"]["kv_bytes_per_token"] * 2 == full
    assert rows["zeroc-rotate-16"]["kv_bytes_per_token"] * 4 == full
    assert rows["zeroc-fold-32"]["weight_bytes"] < rows["none"]["weight_bytes"]


def test_the_engine_bench_runs_both_schedulers_interleaved(capsys):
    torch.set_num_threads(1)
    rc = cli.main(["bench", "engine", "--layers", "1", "--batch", "2", "--prompt", "16", "--new", "6",
                   "--rounds", "1", "--methods", "none", "zeroc-fold-32", "--schedulers", "sync", "async",
                   "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert [(r["method"], r["scheduler"]) for r in report["rows"]] == [
        ("none", "sync"), ("zeroc-fold-32", "sync"), ("none", "async"), ("zeroc-fold-32", "async")]
    s = report["summary"]
    assert set(s) == {"none", "zeroc-fold-32", "none async", "zeroc-fold-32 async"}
    assert s["none async"]["step_over_none"] == [1.0]  # against the uncompressed run of its own scheduler
    for row in s.values():
        assert row["step_ms"] >= row["device_ms"] > 0 and row["syncs_per_step"] == 1


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_sampled_decode_steps_copy_their_ids_once(capsys, top_p):
    """Sampling reads nothing on the host but the sampled ids: on the CPU the cpu backend's engine samples in one
    C++ call (a top-p cut included: the torch path would read one flag there, whether some row's nucleus reaches
    past its ranked candidates, which stalls nothing on the CPU and which a device never reads)."""
    torch.set_num_threads(1)
    rc = cli.main(["bench", "engine", "--layers", "1", "--batch", "2", "--prompt", "16", "--new", "4",
                   "--rounds", "1", "--methods", "none", "--temperature", "0.8", "--top-p", str(top_p), "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["spec"]["temperature"] == 0.8 and report["summary"]["none"]["syncs_per_step"] == 1


def test_compressed_configs_keep_the_rank_in_every_layer():
    base = base_config(EngineBenchSpec(layers=3))
    fold = method_config(base, "zeroc-fold-24")
    assert fold.num_hidden_layers == 3 and all(fold.kv_geometry(i)[1:] == (24, 24) for i in range(3))
    rotate = method_config(base, "zeroc-rotate-32")
    assert rotate.qk_mode(0) == "rotate" and rotate.kv_geometry(2)[1:] == (32, 32)


def test_a_token_tier_method_runs_at_one_sync_and_counts_its_rows_in_the_floor(capsys):
    """`zeroc-fold-R-tier-S-W`: the same ranks with a token tier; a decode step reads the host once, and its floor
    adds the tier's full-rank dims of min(context, S + W) tokens per sequence."""
    torch.set_num_threads(1)
    rc = cli.main(["bench", "engine", "--layers", "2", "--batch", "2", "--prompt", "20", "--new", "4",
                   "--rounds", "1", "--methods", "zeroc-fold-32", "zeroc-fold-32-tier-2-6", "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    plain, tiered = (report["summary"][m] for m in ("zeroc-fold-32", "zeroc-fold-32-tier-2-6"))
    assert tiered["syncs_per_step"] == 1 and tiered["floor_ms"] > plain["floor_ms"]
    base = base_config(EngineBenchSpec(layers=2))
    cfg = method_config(base, "zeroc-fold-32-tier-2-6")
    assert (cfg.compression.sinks, cfg.compression.recent) == (2, 6) and cfg.kv_geometry(1)[1:] == (32, 32)
    no_tier = method_config(base, "zeroc-fold-32")
    # 2 layers x 2 KV heads x (32 + 32) tier dims x 4 bytes on each of min(T, 8) tokens
    assert kv_bytes(cfg, torch.float32, 5) - kv_bytes(no_tier, torch.float32, 5) == 5 * 2 * 2 * 64 * 4
    assert kv_bytes(cfg, torch.float32, 30) - kv_bytes(no_tier, torch.float32, 30) == 8 * 2 * 2 * 64 * 4


@pytest.mark.parametrize("name", ["fold-32", "zeroc-fold", "zeroc-fold-x", "zeroc-fold-33", "zeroc-spin-32",
                                  "zeroc-fold-32-tier-2", "zeroc-fold-32-tier-0-0", "zeroc-fold-32-tear-2-6",
                                  "zeroc-fold-32-tier-x-6"])
def test_bad_method_names_raise_value_error(name):
    with pytest.raises(ValueError, match="methods"):
        parse_method(name, 64)
    with pytest.raises(ValueError, match="methods"):
        EngineBenchSpec(methods=("none", name))


def test_a_profiled_run_names_the_ops_of_one_decode_step(capsys):
    """--profile: one decode step per method under torch's profiler, in place of the last timed step; its ops by
    self time (the host's on the CPU) in the JSON and the text report, the linear layers among them."""
    torch.set_num_threads(1)
    args = ["bench", "engine", "--layers", "1", "--batch", "2", "--prompt", "16", "--new", "4", "--rounds", "1",
            "--methods", "none", "zeroc-fold-32-tier-2-6", "--profile"]
    assert cli.main(args + ["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    for row in report["summary"].values():
        assert row["syncs_per_step"] == 1 and 0 < len(row["profile"]) <= 15
        assert any("linear" in op["name"] or "addmm" in op["name"] or "mm" == op["name"].split("::")[-1]
                   for op in row["profile"]), row["profile"]
        assert all(op["ms"] > 0 and op["calls"] >= 1 for op in row["profile"])
        ms = [op["ms"] for op in row["profile"]]
        assert ms == sorted(ms, reverse=True)
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    assert "zeroc-fold-32-tier-2-6: one decode step's top ops by self host ms" in text


@pytest.mark.parametrize("new, profile", [(2, False), (3, True)])
def test_too_few_new_tokens_to_time_a_step_raise_value_error(new, profile):
    with pytest.raises(ValueError, match=f"new must be >= {new + 1}"):
        EngineBenchSpec(new=new, profile=profile)


def test_the_bench_runs_in_the_dtype_asked_for(capsys):
    """--dtype: bf16 weights and KV on the CPU (where auto is fp32): half the KV and weight bytes of fp32."""
    torch.set_num_threads(1)
    reports = {}
    for dtype in ("auto", "bfloat16"):
        assert cli.main(["bench", "engine", "--layers", "1", "--batch", "2", "--prompt", "16", "--new", "4",
                         "--rounds", "1", "--methods", "none", "--dtype", dtype, "--json"]) == 0
        reports[dtype] = json.loads(capsys.readouterr().out)
    assert reports["auto"]["dtype"] == "float32" and reports["bfloat16"]["dtype"] == "bfloat16"
    fp32, bf16 = (reports[d]["rows"][0] for d in ("auto", "bfloat16"))
    assert bf16["kv_bytes_per_token"] * 2 == fp32["kv_bytes_per_token"]
    assert bf16["weight_bytes"] * 2 == fp32["weight_bytes"]
    assert bf16["step_ms"] > 0 and bf16["syncs_per_step"] == 1
    with pytest.raises(ValueError, match="dtype must be auto, float32, bfloat16 or float16, got 'int8'"):
        EngineBenchSpec(dtype="int8")
