"""`--kv-policy` of `zeroc serve` / `zeroc generate`: one-line errors with exit 2, and a local generation."""

from __future__ import annotations

import json

import pytest

from cli_runs import zeroc_here as zeroc
from zeroc.cli import main
from zeroc.config import CacheConfig
from zeroc.engine import Engine
from zeroc.sampling import SamplingParams

BAD = [
    (["serve", "decode", "--colocated", "--kv-policy", "kivi4"], "unknown KV policy 'kivi4'"),
    (["serve", "decode", "--colocated", "--kv-policy", "h2o", "--kv-budget", "1.5"], "budget must be in (0, 1]"),
    (["serve", "decode", "--colocated", "--kv-policy", "h2o", "--kv-budget", "0"], "budget must be in (0, 1]"),
    (["serve", "decode", "--colocated", "--kv-policy", "h2o", "--kv-max-tokens", "-1"], "max_tokens"),
    (["serve", "decode", "--colocated", "--kv-budget", "0.5"], "need a --kv-policy"),
    (["serve", "decode", "--colocated", "--kv-policy", "kivi-4", "--kv-budget", "0.5"], "does not apply to kivi-4"),
    (["serve", "decode", "--colocated", "--kv-policy", "kivi-2", "--kv-residual", "40"], "multiple of the group"),
    (["serve", "decode", "--colocated", "--kv-policy", "kivi-4", "--block-size", "16"], "must equal its group"),
    (["serve", "decode", "--prefill", "127.0.0.1:1", "--kv-policy", "h2o"], "--colocated"),
    (["serve", "prefill", "--kv-policy", "h2o", "--kv-budget", "0.5"], "--colocated"),
    (["generate", "x", "--kv-policy", "h2o", "--kv-residual", "32"], "kivi-4 and kivi-2 only"),
    (["serve", "decode", "--colocated", "--kv-policy", "streamingllm", "--kv-budget", "1.5"], "budget must be in (0, 1]"),
    (["serve", "decode", "--colocated", "--kv-policy", "snapkv", "--kv-max-tokens", "8"], "h2o only, not snapkv"),
    (["serve", "decode", "--colocated", "--kv-policy", "palu", "--kv-budget", "0"], "budget must be in (0, 1]"),
    (["generate", "x", "--kv-policy", "palu", "--kv-residual", "32"], "kivi-4 and kivi-2 only"),
    (["serve", "prefill", "--kv-policy", "snapkv", "--kv-budget", "0.5"], "--colocated"),
    (["serve", "decode", "--prefill", "127.0.0.1:1", "--kv-policy", "snapkv"], "--colocated"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join(a[2:]) for a, _ in BAD])
def test_bad_policy_settings_are_one_line_errors(capsys, argv, message):
    p = zeroc(capsys, *argv)
    assert p.returncode == 2 and p.stdout == ""
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("zeroc: error:") and message in lines[0], p.stderr


def test_a_malformed_byte_size_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "x", "--cache-bytes", "lots"])
    assert exit_.value.code == 2 and "not a byte size" in capsys.readouterr().err


def test_generate_with_kivi_from_the_environment(capsys, monkeypatch, bundled):
    """ZEROC_CACHE_KV_POLICY picks the policy; the block size defaults to KIVI's group; 1M of cache suffices."""
    monkeypatch.setenv("ZEROC_CACHE_KV_POLICY", "kivi-2")
    p = zeroc(capsys, "generate", "Lists are mutable sequences, typically used to store collections of "
              "homogeneous items.", "--max-tokens", "20", "--cache-bytes", "1M", "--json")
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    want = Engine(bundled, CacheConfig(block_size=32, kv_policy="kivi-2")).generate(
        ["Lists are mutable sequences, typically used to store collections of homogeneous items."],
        SamplingParams(max_new_tokens=20))[0]
    assert got["token_ids"] == want.token_ids
