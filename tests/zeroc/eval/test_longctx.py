"""`zeroc eval longctx`: deterministic tasks whose answer is in the prompt, the uncompressed paged run
against a no-cache greedy reference, and every registry method through the command."""

from __future__ import annotations

import json

import pytest

from zeroc.cli import main
from zeroc.config import BUNDLED_HELDOUT
from zeroc.data import read_eval_tokens
from zeroc.eval.longctx import LongCtxConfig, build_samples, generate_dense, generate_paged, run_longctx, score
from zeroc.eval.longctx_report import accuracy
from zeroc.eval.longctx_tasks import PASSKEY_DEPTHS, TASKS, clip_contexts, is_correct, make_samples
from zeroc.policies import POLICY_NAMES, cache_config, method_at_budget


@pytest.fixture(scope="module")
def haystack(bundled):
    return read_eval_tokens(bundled.tokenizer, BUNDLED_HELDOUT).tolist()[1:]


def test_tasks_are_deterministic_and_hold_their_answer(bundled, haystack):
    tok = bundled.tokenizer
    a = make_samples(tok, haystack, TASKS, (300, 700), 3, seed=7)
    assert a == make_samples(tok, haystack, TASKS, (300, 700), 3, seed=7)
    other = make_samples(tok, haystack, TASKS, (300, 700), 3, seed=8)
    assert [s.answer for s in a] != [s.answer for s in other]
    for s in a:
        assert len(s.prompt) == s.ctx and s.prompt[0] == tok.bos_id
        text = tok.decode(list(s.prompt))
        question = text.rindex("\n")  # the question is the last line; the answer must be stated before it
        assert s.answer in text[:question], (s.task, s.answer)
        assert s.answer not in text[question:]
        assert not is_correct(s, text[question:])
        assert is_correct(s, f" {s.answer}.\n")
    passkeys = [s for s in a if s.task == "passkey" and s.ctx == 700]
    assert [s.depth for s in passkeys] == list(PASSKEY_DEPTHS[:3])
    assert all(s.depth <= 0.1 for s in a if s.task == "fact")


def test_contexts_are_clipped_to_the_model():
    assert clip_contexts((1024, 2048, 4096), 2048) == (1024, 2032)


def test_uncompressed_cache_matches_the_no_cache_reference(bundled):
    cfg = LongCtxConfig(contexts=(200,), per_cell=1, batch_size=3, chunk=64)
    samples = build_samples(bundled, BUNDLED_HELDOUT, cfg)
    assert {s.task for s in samples} == set(TASKS)
    dense = generate_dense(bundled.model, samples)
    paged = generate_paged(bundled.model, samples, None, cfg.batch_size, cfg.chunk)
    assert paged == dense
    rows_d, rows_p = (score(bundled, samples, g, "m", 1.0) for g in (dense, paged))
    assert accuracy(rows_p, "m", 1.0) == accuracy(rows_d, "m", 1.0)


def test_eviction_at_budget_one_is_the_uncompressed_run(bundled):
    cfg = LongCtxConfig(contexts=(96,), tasks=("passkey",), per_cell=2, chunk=40)
    samples = build_samples(bundled, BUNDLED_HELDOUT, cfg)
    base = generate_paged(bundled.model, samples, None, cfg.batch_size, cfg.chunk)
    for name in ("streamingllm", "h2o", "snapkv"):
        cache = cache_config(method_at_budget(name, 1.0, bundled.config, 120))
        assert generate_paged(bundled.model, samples, cache, cfg.batch_size, cfg.chunk) == base, name


def test_every_registry_method_runs_through_the_command(bundled, tmp_path, capsys):
    code = main(["eval", "longctx", "--contexts", "96", "--tasks", "passkey", "fact", "--samples", "1",
                 "--budgets", "1.0", "0.5", "--out-dir", str(tmp_path), "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    rows = out["rows"]
    for name in ("uncompressed", *POLICY_NAMES):
        for b in (1.0, 0.5):
            cell = [r for r in rows if r["method"] == name and r["budget"] == b]
            assert cell, (name, b)
            # each either ran every sample or says why the budget is out of its reach
            assert sum(r["total"] for r in cell) == 2 or all(r["note"] for r in cell), (name, b)
    assert any(r["method"] == "int8" and r["budget"] == 0.5 and r["note"] for r in rows)
    md = (tmp_path / "longctx.md").read_text()
    assert "| snapkv |" in md and "| uncompressed |" in md
    assert (tmp_path / "longctx.png").stat().st_size > 1000


def test_config_is_validated():
    with pytest.raises(ValueError, match="budgets"):
        LongCtxConfig(budgets=(0.0,))
    with pytest.raises(ValueError, match="methods"):
        LongCtxConfig(methods=("zip",))
    with pytest.raises(ValueError, match="tasks"):
        LongCtxConfig(tasks=("sudoku",))
    with pytest.raises(ValueError, match="calib_file"):
        run_longctx(None, BUNDLED_HELDOUT, LongCtxConfig(zeroc=True))
