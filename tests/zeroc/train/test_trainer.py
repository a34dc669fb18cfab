"""`zeroc train` end to end on a small corpus: splits, tokenizer, learning, an HF-loadable output."""

from __future__ import annotations

import json
import math

import torch

from zeroc.config import BUNDLED_CALIB
from zeroc.loader import load_model
from zeroc.train.corpus import read_documents, split_corpus
from zeroc.train.trainer import TrainConfig, train


def _corpus(tmp_path, n_files=12):
    text = BUNDLED_CALIB.read_text()[:120_000]
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    size = len(text) // n_files
    for i in range(n_files):
        (root / ("sub" if i % 2 else "") / f"doc{i}.rst.txt").write_text(text[i * size:(i + 1) * size])
    return root


def test_split_is_deterministic_and_disjoint(tmp_path):
    root = _corpus(tmp_path)
    docs = read_documents(root)
    assert docs == read_documents(root)
    split = split_corpus(docs, heldout_bytes=15_000, calib_bytes=15_000)
    assert split.heldout_files and split.calib_files
    assert not set(split.heldout_files) & set(split.calib_files)
    assert len(split.train) + len(split.heldout) + len(split.calib) == len(docs)


def test_training_learns_and_writes_a_loadable_hf_model(tmp_path, hf_model_of):
    cfg = TrainConfig(vocab_size=600, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2,
                      num_kv_heads=1, seq_len=64, batch_size=4, lr=3e-3, warmup_steps=5, max_steps=150,
                      minutes=5, heldout_bytes=15_000, calib_bytes=15_000)
    out, data = tmp_path / "model", tmp_path / "data"
    summary = train(_corpus(tmp_path), out, data, cfg)
    assert summary["steps"] == 150
    assert summary["first_loss"] > math.log(600) - 0.5  # starts near a uniform guess
    assert summary["final_loss"] < summary["first_loss"] - 1.5  # and learns
    assert (data / "heldout.txt").stat().st_size > 10_000 and (data / "calib.txt").stat().st_size > 10_000
    assert json.loads((out / "training.json").read_text())["steps"] == 150
    loaded = load_model(out)
    assert loaded.config.num_key_value_heads == 1 and loaded.config.head_dim == 32
    text = "Lists are mutable sequences."
    assert loaded.tokenizer.decode(loaded.tokenizer.encode(text)) == text
    tokens = torch.tensor([loaded.tokenizer.encode(text)])
    with torch.no_grad():
        assert (loaded.model(tokens) - hf_model_of(out)(tokens).logits).abs().max() < 1e-4


def test_long_context_recipe_learns_retrieval_sequences(tmp_path):
    """The recipe's mix (an extra training-only corpus, half the sequences synthetic long-range tasks,
    GQA with 4 KV heads of head_dim 64) trains, and the loss goes down in a few steps."""
    root = _corpus(tmp_path)
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "more.txt").write_text(BUNDLED_CALIB.read_text()[120_000:160_000])
    cfg = TrainConfig(vocab_size=400, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                      num_kv_heads=4, head_dim=64, seq_len=512, max_position_embeddings=1024, batch_size=2, lr=3e-3,
                      warmup_steps=3, max_steps=40, minutes=5, heldout_bytes=15_000, calib_bytes=15_000,
                      synthetic_fraction=0.5, extra_corpora=(str(extra),), threads=1)
    summary = train(root, tmp_path / "model", None, cfg)
    assert summary["steps"] == 40 and summary["train_tokens"] > 30_000  # the extra corpus is in the stream
    assert summary["final_loss"] < summary["first_loss"] - 0.6  # from ~log(400) = 6.0
    loaded = load_model(tmp_path / "model")
    assert (loaded.config.num_key_value_heads, loaded.config.head_dim) == (4, 64)


def test_synthetic_sequences_end_with_an_answer_planted_far_back(tmp_path):
    import random

    from zeroc.tokenizer import Tokenizer
    from zeroc.config import BUNDLED_MODEL
    from zeroc.train.synthetic import sample_batch, synthetic_sequence

    tok = Tokenizer.from_dir(BUNDLED_MODEL)
    stream = torch.tensor(tok.encode(BUNDLED_CALIB.read_text()[:60_000]))
    rng = random.Random(0)
    for _ in range(16):
        seq, answer, mask = synthetic_sequence(tok, stream, 1024, rng)
        assert seq.shape == mask.shape == (1024,)
        text = tok.decode(seq.tolist())
        tail = text[-len(answer) - 40:]
        assert answer.strip() in tail  # the sequence ends with the answer...
        assert answer.strip() in text[: text.rindex(answer.strip())]  # ...which was planted before
    batch = sample_batch(tok, stream, 8, 512, 0.5, random.Random(1))
    assert batch.ids.shape == batch.answer_mask.shape == (8, 512)
    again = sample_batch(tok, stream, 8, 512, 0.5, random.Random(1))
    assert torch.equal(batch.ids, again.ids) and torch.equal(batch.answer_mask, again.answer_mask)
    assert all(bool(m.any()) == bool(k) for m, k in zip(batch.answer_mask, batch.kinds))  # plain rows: no answer
