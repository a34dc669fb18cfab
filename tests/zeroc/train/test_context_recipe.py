"""The retrieval-training additions: answer masks, the length curriculum, warm starts from a model."""

from __future__ import annotations

import json
import random

import pytest
import torch

from zeroc.config import BUNDLED_CALIB, BUNDLED_MODEL
from zeroc.loader import load_model
from zeroc.tokenizer import Tokenizer
from zeroc.train.schedule import check_curriculum, lr_at, progress, stage_at
from zeroc.train.synthetic import KINDS, sample_batch, synthetic_sequence
from zeroc.train.trainer import TrainConfig, train


@pytest.fixture(scope="module")
def tok_stream():
    tok = Tokenizer.from_dir(BUNDLED_MODEL)
    return tok, torch.tensor(tok.encode(BUNDLED_CALIB.read_text()[:40_000]))


@pytest.mark.parametrize("kind", KINDS)
def test_answer_mask_covers_exactly_the_answer_tokens(tok_stream, kind):
    tok, stream = tok_stream
    rng = random.Random(kind)
    for _ in range(8):
        seq, answer, mask = synthetic_sequence(tok, stream, 400, rng, kind)
        idx = mask.nonzero().flatten()
        assert len(idx) > 0 and torch.equal(idx, torch.arange(int(idx[0]), int(idx[-1]) + 1))  # one run
        assert tok.decode(seq[mask].tolist()).strip() == answer.strip()
        assert int(idx[-1]) >= 400 - 3  # at the end: only the closing "." or newline may follow
        before = tok.decode(seq[: int(idx[0])].tolist())
        assert answer.strip() in before  # planted earlier: retrieval, not guessing
        span, start = seq[mask].tolist(), int(idx[0])
        if kind in ("copy", "repeat"):  # the same token ids were planted earlier
            assert any(seq[i: i + len(span)].tolist() == span for i in range(start - len(span)))
        else:  # the tokens the eval's prompt (which ends at the cue) is followed by
            assert span == tok.encode(" " + answer, add_special_tokens=False)


def test_kind_weights_choose_the_synthetic_kinds_and_repeat_spans_are_long(tok_stream):
    tok, stream = tok_stream
    only_repeat = tuple(float(k == "repeat") for k in KINDS)
    batch = sample_batch(tok, stream, 12, 256, 1.0, random.Random(0), only_repeat)
    assert batch.kinds == ("repeat",) * 12
    # the second copy is the answer: spans reach half the row, so most repeat rows train induction densely
    assert all(256 // 4 <= int(m.sum()) <= 256 // 2 - 24 for m in batch.answer_mask)
    vocab = torch.cat([row[m] for row, m in zip(batch.ids, batch.answer_mask)])
    assert vocab.min() >= 2 and vocab.unique().numel() > 0.9 * vocab.numel()  # uniform: few repeats, no <s> / </s>
    for length in (48, 64, 100):  # the shortest rows still fit a repeat sequence
        assert sample_batch(tok, stream, 4, length, 1.0, random.Random(length), only_repeat).ids.shape == (4, length)
    assert set(sample_batch(tok, stream, 40, 256, 1.0, random.Random(1)).kinds) == set(KINDS)  # () draws all
    with pytest.raises(ValueError, match="kind weights"):  # checked once, where the training run is configured
        TrainConfig(kind_weights=(1.0, 2.0))


def test_curriculum_trains_short_first_at_constant_tokens_per_step():
    stages = ((0.0, 256), (0.3, 512), (0.6, 2048))
    check_curriculum(stages, 2048)
    assert stage_at(0.0, stages, 2048, 2) == (256, 16)
    assert stage_at(0.29, stages, 2048, 2) == (256, 16)
    assert stage_at(0.3, stages, 2048, 2) == (512, 8)
    assert stage_at(0.99, stages, 2048, 2) == (2048, 2)
    assert stage_at(0.5, (), 1024, 4) == (1024, 4)  # no curriculum: the configured shape throughout
    for bad in (((0.1, 256),), ((0.0, 512), (0.5, 256), (0.4, 1024)), ((0.0, 4096),), ((0.0, 256), (1.0, 512))):
        with pytest.raises(ValueError, match="curriculum"):
            check_curriculum(bad, 2048)
    with pytest.raises(ValueError, match="curriculum"):
        TrainConfig(seq_len=1024, curriculum=((0.0, 2048),))


def test_schedule_ends_at_steps_or_time_and_decays_the_rate():
    assert progress(50, 100, 10.0, 100.0) == 0.5
    assert progress(10, 100, 80.0, 100.0) == 0.8  # the clock ran out first
    assert progress(200, 100, 1.0, 100.0) == 1.0
    assert lr_at(0.0, 0, 1e-3, 10, 0.1) == pytest.approx(1e-4)  # warming up
    assert lr_at(0.0, 10, 1e-3, 10, 0.1) == pytest.approx(1e-3)
    assert lr_at(0.5, 50, 1e-3, 10, 0.1) == pytest.approx(0.55e-3)
    assert lr_at(1.0, 99, 1e-3, 10, 0.1) == pytest.approx(1e-4)


def test_warm_start_continues_the_model_and_logs_retrieval(tmp_path):
    """Three steps from the bundled model: its tokenizer and shapes are kept, the weights move, and the log
    records the answer loss, which starts far above the next-token loss of text the model has read."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    text = BUNDLED_CALIB.read_text()
    for i in range(6):
        (corpus / f"doc{i}.txt").write_text(text[i * 20_000:(i + 1) * 20_000])
    cfg = TrainConfig(init_from=str(BUNDLED_MODEL), seq_len=256, batch_size=1, curriculum=((0.0, 128), (0.5, 256)),
                      answer_weight=2.0, synthetic_fraction=1.0, max_steps=3, minutes=5, lr=1e-3, warmup_steps=1,
                      heldout_bytes=20_000, calib_bytes=20_000, log_every=1, threads=1)
    summary = train(corpus, tmp_path / "model", None, cfg)
    assert summary["steps"] == 3 and summary["tokens_seen"] == 3 * 256  # 2 steps of 2 rows of 128, then 1 row of 256
    assert [e["seq_len"] for e in summary["log"]] == [128, 128, 256]
    assert all(e["loss"] == pytest.approx(e["lm_loss"] + 2.0 * e["answer_loss"], rel=1e-5) for e in summary["log"])
    before, after = load_model(BUNDLED_MODEL), load_model(tmp_path / "model")
    assert after.config.hidden_size == before.config.hidden_size
    assert after.tokenizer.encode("pass key 12345") == before.tokenizer.encode("pass key 12345")
    w0, w1 = before.model.model.layers[0].mlp.up_proj.weight, after.model.model.layers[0].mlp.up_proj.weight
    assert 0 < (w1 - w0.bfloat16().float()).abs().max() < 0.1  # moved, but a few small steps
    assert json.loads((tmp_path / "model" / "training.json").read_text())["config"]["init_from"] == str(BUNDLED_MODEL)
