"""`--device` and `--dtype` on every command that loads a model."""

from __future__ import annotations

import json

import pytest

from cli_runs import zeroc_here
from zeroc.cli import build_parser
from zeroc.config import BUNDLED_HELDOUT

COMMANDS = [["calibrate", "--budget", "0.5", "--out", "x"], ["eval", "ppl"], ["eval", "quality"],
            ["generate", "hi"], ["serve", "prefill"], ["serve", "decode"]]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_device_and_dtype_are_flags(command):
    args = build_parser().parse_args([*command, "--device", "cuda:1", "--dtype", "bf16"])
    assert (args.device, args.dtype) == ("cuda:1", "bf16")


def test_eval_runs_in_bfloat16_and_float32_close(capsys):
    common = ["eval", "ppl", "--data", str(BUNDLED_HELDOUT), "--ctx", "128", "--max-tokens", "300", "--json",
              "--device", "cpu"]
    fp32, bf16 = (zeroc_here(capsys, *common, "--dtype", dtype) for dtype in ("float32", "bfloat16"))
    assert fp32.returncode == bf16.returncode == 0, (fp32.stderr, bf16.stderr)
    a, b = json.loads(fp32.stdout)["perplexity"], json.loads(bf16.stdout)["perplexity"]
    assert a != b and abs(a - b) / a < 0.05  # bf16 really ran, and stays close


def test_bad_device_is_a_user_error(capsys):
    r = zeroc_here(capsys, "eval", "ppl", "--device", "tpu", "--max-tokens", "100")
    assert r.returncode == 2 and "device must be cpu, cuda or cuda:N" in r.stderr
