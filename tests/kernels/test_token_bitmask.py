"""Structured output's token mask (kernels/token_bitmask.py): the torch reference, the Triton kernel (in the
interpreter) and the C++ call (csrc/sampling.cpp) against a token-at-a-time oracle, on rows strided as the
engine's scores are, in every dtype a model computes in; bad packing is a ValueError."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from zeroc_kernels.token_bitmask import apply_token_bitmask, apply_token_bitmask_ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def oracle(scores: torch.Tensor, packed: torch.Tensor, r: int) -> torch.Tensor:
    """A copy of scores with each excluded token, one at a time, at the dtype's lowest finite value."""
    out, words = scores.clone(), (packed.shape[0] - r) // r
    for i in range(r):
        row = int(packed[r * words + i])
        for t in range(scores.shape[1]):
            if not (int(packed[i * words + t // 32]) >> (t % 32)) & 1:
                out[row, t] = torch.finfo(scores.dtype).min
    return out


@pytest.fixture(scope="module")
def appliers(cpu_kernel):
    return {"torch": apply_token_bitmask_ref, "triton": apply_token_bitmask, "cpu": cpu_kernel.apply_token_bitmask}


def _case(seed: int, batch: int, vocab: int, extra_words: int, dtype: torch.dtype):
    """Scores [batch, vocab] as a view with a row stride past vocab (the penalties' scratch is one), and a packing
    of some rows' bitmasks: random words, and whole words of ones and of zeros, as grammars give."""
    gen = torch.Generator().manual_seed(seed)
    scores = (torch.randn(batch, vocab + 3, generator=gen) * 4).to(dtype)[:, :vocab]
    rows = torch.randperm(batch, generator=gen)[: 1 + seed % batch].to(torch.int32)
    words = -(-vocab // 32) + extra_words
    bits = torch.randint(-2**31, 2**31 - 1, (len(rows), words), generator=gen, dtype=torch.int64).to(torch.int32)
    kind = torch.randint(0, 3, (len(rows), words), generator=gen)
    bits = torch.where(kind == 0, -1, torch.where(kind == 1, 0, bits)).to(torch.int32)
    return scores, torch.cat([bits.flatten(), rows]), len(rows)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), batch=st.integers(1, 6), vocab=st.sampled_from([1, 31, 32, 100, 1024, 1500]),
       extra_words=st.integers(0, 2), dtype=st.sampled_from(DTYPES))
def test_every_build_is_the_oracle(appliers, seed, batch, vocab, extra_words, dtype):
    scores, packed, r = _case(seed, batch, vocab, extra_words, dtype)
    want = oracle(scores, packed, r)
    for name, apply in appliers.items():
        got = scores.clone()
        apply(got, packed, r)
        assert torch.equal(got, want), name
        assert torch.isfinite(got).all(), name  # never -inf: the samplers read that as a broken row


def test_unguided_rows_and_the_row_stride_padding_are_untouched(appliers):
    base = torch.randn(4, 40)
    packed = torch.cat([torch.zeros(2, dtype=torch.int32), torch.tensor([2], dtype=torch.int32)])  # row 2: none
    for name, apply in appliers.items():
        full = base.clone()
        apply(full[:, :33], packed, 1)  # 33 tokens in two words; columns 33.. lie in the stride only
        assert torch.equal(full[[0, 1, 3]], base[[0, 1, 3]]), name
        assert (full[2, :33] == torch.finfo(torch.float32).min).all() and torch.equal(full[2, 33:], base[2, 33:])


@pytest.mark.parametrize("name", ["triton", "cpu", "torch"])
def test_bad_packing_is_a_value_error(appliers, name):
    apply, scores = appliers[name], torch.zeros(2, 64)
    with pytest.raises(ValueError, match="do not hold"):
        apply(scores, torch.zeros(5, dtype=torch.int32), 2)  # 5 int32s: not 2 rows of words plus 2 indices
    if name != "torch":  # the reference reads what a valid packing holds; the kernels check
        with pytest.raises(ValueError, match="cannot cover"):
            apply(scores, torch.tensor([-1, 0], dtype=torch.int32), 1)  # one word for 64 tokens
    if name == "cpu":  # a row index is the host's to check where the kernel itself reads it
        with pytest.raises(ValueError, match="not in"):
            apply(scores, torch.tensor([-1, -1, 7], dtype=torch.int32), 1)
