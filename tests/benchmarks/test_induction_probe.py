"""The induction probe: its rows hold exactly one repeated span, the mask marks the copy's predictable tokens,
and a short run reports its log."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "induction_probe.py"
_spec = importlib.util.spec_from_file_location("induction_probe", SCRIPT)
probe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(probe)


def test_rows_repeat_one_span_and_mask_what_copying_predicts():
    gen = torch.Generator().manual_seed(0)
    for offset in ("random", "fixed"):
        ids, mask = probe.rows(gen, 16, 100, 20, offset)
        assert ids.shape == (16, 100) and mask.shape == (16, 99)
        assert ids.min() >= 2  # <s> and </s> never drawn
        assert (mask.sum(1) == 19).all()  # every copied token but the first
        for row, m in zip(ids, mask):
            targets = (m.nonzero().flatten() + 1).tolist()  # positions of the predictable tokens in the row
            e = targets[0] - 1  # where the copy starts
            # the copy's tokens occurred before, in the same order: copying predicts them
            assert any(row[s:s + 20].tolist() == row[e:e + 20].tolist() for s in range(0, e - 19))
            if offset == "fixed":
                assert e == 20 and row[:20].tolist() == row[20:40].tolist()


def test_short_run_reports_steps_tokens_and_the_copy_loss(tmp_path):
    out = tmp_path / "probe.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "--max-steps", "3", "--hidden", "128", "--layers", "2",
                        "--heads", "2", "--kv-heads", "2", "--rows", "2", "--span", "8", "--length", "40", "--quiet",
                        "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert (res["steps"], res["tokens"], res["offset"]) == (3, 3 * 2 * 40, "random")
    assert [e["step"] for e in res["log"]] == [0, 2]
    assert all(abs(e["copy_loss"] - res["chance"]) < 1.0 for e in res["log"])  # untrained: near chance
    assert res["formed_at_step"] is None and "not formed" in r.stdout
    bad = subprocess.run([sys.executable, str(SCRIPT), "--span", "50", "--length", "80"], capture_output=True,
                         text=True)
    assert bad.returncode != 0 and "--length must be at least" in bad.stderr
