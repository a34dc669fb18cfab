"""The `zeroc` command in real processes: JSON outputs, and one-line errors for user mistakes."""

from __future__ import annotations

import json

import pytest

from cli_runs import zeroc
from zeroc.config import BUNDLED_HELDOUT, BUNDLED_MODEL
from zeroc.tokenizer import Tokenizer


def test_eval_ppl_json_both_modes_agree():
    common = ["eval", "ppl", "--data", str(BUNDLED_HELDOUT), "--ctx", "128", "--max-tokens", "300", "--json"]
    full = zeroc(*common)
    stream = zeroc(*common, "--streaming")
    assert full.returncode == 0, full.stderr
    assert stream.returncode == 0, stream.stderr
    a, b = json.loads(full.stdout), json.loads(stream.stdout)
    assert a["mode"] == "full" and b["mode"] == "streaming"
    assert a["tokens"] == b["tokens"] == 300 - 3
    assert abs(a["perplexity"] - b["perplexity"]) / a["perplexity"] < 1e-3


def test_generate_json_is_deterministic_when_greedy():
    runs = [zeroc("generate", "--json", "--max-tokens", "8", "The built-in function") for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr
    a, b = (json.loads(r.stdout) for r in runs)
    assert a["token_ids"] == b["token_ids"] and len(a["token_ids"]) <= 8
    assert a["finish_reason"] in ("stop", "length")


def test_generate_takes_logprobs_and_penalties():
    r = zeroc("generate", "--json", "--max-tokens", "8", "--logprobs", "2", "--repetition-penalty", "1.3",
              "--frequency-penalty", "0.5", "--prompt-logprobs", "1", "The built-in function")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    plain = json.loads(zeroc("generate", "--json", "--max-tokens", "8", "The built-in function").stdout)
    assert len(out["logprobs"]) == len(out["token_ids"]) and out["token_ids"] != plain["token_ids"]
    assert all(len(lp["top"]) == 2 and lp["logprob"] <= lp["top"][0][1] + 1e-6 for lp in out["logprobs"])
    assert "logprobs" not in plain and "prompt_logprobs" not in plain
    prompt = Tokenizer.from_dir(BUNDLED_MODEL).encode("The built-in function")
    assert len(out["prompt_logprobs"]) == len(prompt) - 1 and all(len(lp["top"]) == 1 for lp in out["prompt_logprobs"])


def test_generate_takes_a_guide_from_the_command_line_or_a_file(tmp_path):
    schema = {"type": "object", "required": ["n"], "additionalProperties": False,
              "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    for args, holds in [(["--choice", "yes", "--choice", "no"], lambda t: t in ("yes", "no")),
                        (["--json-schema", f"@{tmp_path / 'schema.json'}"], lambda t: 0 <= json.loads(t)["n"] <= 9),
                        (["--grammar", 'root ::= "x" [0-9]'], lambda t: len(t) == 2 and t[0] == "x")]:
        r = zeroc("generate", "--json", "--max-tokens", "16", *args, "The answer is")
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out["finish_reason"] == "stop" and holds(out["text"]), (args, out)


def test_bench_forward_reports_positive_rates():
    r = zeroc("bench", "forward", "--json", "--prefill", "64", "--decode-batch", "2")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    names = [(row["name"], row["tokens"]) for row in report["results"]]
    assert names == [("prefill", 64), ("decode", 2)]
    assert all(row["tokens_per_s"] > 0 for row in report["results"])


@pytest.mark.parametrize("args, message", [
    (["eval", "ppl", "--model", "/nonexistent/model"], "/nonexistent/model: model directory not found"),
    (["eval", "ppl", "--data", "/nonexistent/data.txt"], "/nonexistent/data.txt: data file not found"),
    (["generate", "--temperature", "-1", "hi"], "temperature must be 0 (greedy) or in"),
    (["generate", "--repetition-penalty", "0", "hi"], "repetition_penalty must be in (0, 10]"),
    (["generate", ""], "prompt is empty"),
    (["eval", "ppl", "--ctx", "1"], "ctx must be >= 2"),
    (["generate", "--dtype", "float8", "hi"], "dtype must be auto, float32, bfloat16 or float16, got 'float8'"),
    (["generate", "--regex", "a(b", "hi"], "guide: the regex does not compile: Regex parsing error at position 4"),
    (["generate", "--json-schema", "@/nonexistent/schema.json", "hi"], "/nonexistent/schema.json: file not found"),
    (["generate", "--guide-after", "</think>", "hi"], "--guide-after: give a guide too"),
    (["generate", "--temperature", "1", "--min-p", "1.5", "hi"], "min_p must be in [0, 1]"),
    (["generate", "--regex", "a", "--guide-after", "no such token", "hi"], "tokens of this model's vocabulary"),
])
def test_user_errors_exit_2_with_one_line_and_no_traceback(args, message):
    r = zeroc(*args)
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0


def test_unsupported_architecture_is_a_user_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    r = zeroc("eval", "ppl", "--model", str(tmp_path))
    assert r.returncode == 2 and "unsupported architecture" in r.stderr and "Traceback" not in r.stderr
