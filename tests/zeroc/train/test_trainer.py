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
