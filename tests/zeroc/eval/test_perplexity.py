"""Perplexity: full-pass and streaming agree, and both equal the value from HF's logits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from zeroc.config import BUNDLED_HELDOUT, ZeroCError
from zeroc.eval.perplexity import perplexity_full, perplexity_streaming
from zeroc.data import read_eval_tokens, windows_of


def test_windows_cover_every_token_once():
    tokens = torch.arange(10)
    wins = windows_of(tokens, 4)
    assert [w.tolist() for w in wins] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [w.tolist() for w in windows_of(torch.arange(9), 4)] == [[0, 1, 2, 3], [4, 5, 6, 7]]


@pytest.fixture(scope="module")
def heldout_tokens(bundled):
    return read_eval_tokens(bundled.tokenizer, BUNDLED_HELDOUT, max_tokens=700)


def test_full_and_streaming_agree_and_match_hf(bundled, heldout_tokens, hf_model_of):
    full = perplexity_full(bundled.model, heldout_tokens, ctx=256, progress=False)
    stream = perplexity_streaming(bundled.model, heldout_tokens, ctx=256, batch_size=2, progress=False)
    assert full.tokens == stream.tokens == 700 - 3  # windows of 256, 256, 188: one unscored token each
    assert full.windows == stream.windows == 3
    assert abs(full.perplexity - stream.perplexity) / full.perplexity < 1e-3
    hf = hf_model_of(bundled.path)
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in windows_of(heldout_tokens, 256):
            logits = hf(w[None, :-1]).logits[0]
            nll += F.cross_entropy(logits, w[1:], reduction="sum").item()
            count += w.numel() - 1
    assert full.perplexity == pytest.approx(math.exp(nll / count), rel=1e-4)


def test_bad_data_files_name_the_file(bundled, tmp_path):
    with pytest.raises(ZeroCError, match="missing.txt: data file not found"):
        read_eval_tokens(bundled.tokenizer, tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ZeroCError, match="empty.txt: data file is empty"):
        read_eval_tokens(bundled.tokenizer, empty)
