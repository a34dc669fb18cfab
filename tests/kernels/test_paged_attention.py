"""paged_attention_ref against plain causal attention over contiguous K/V (the oracle)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from zeroc_kernels.paged_attention import paged_attention_ref, rows_contiguous


def naive_attention(q, k, v, ctx_start):
    # q: [Tq, heads, d]; k, v: [Tk, kv_heads, d]; query i sits at position ctx_start + i
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[-1])
    q_pos = ctx_start + torch.arange(q.shape[0])
    mask = torch.arange(k.shape[0])[None, :] <= q_pos[:, None]
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


@settings(max_examples=25, deadline=None)
@given(
    block_size=st.sampled_from([16, 32]),
    group=st.sampled_from([1, 4, 8]),
    kv_heads=st.sampled_from([1, 2]),
    dims=st.sampled_from([(16, 16), (64, 64), (32, 48), (48, 16), (128, 128)]),  # ZeroC: q/k != v width
    seqs=st.lists(st.tuples(st.integers(1, 80), st.integers(0, 70)), min_size=1, max_size=5),
    seed=st.integers(0, 2**16),
)
def test_matches_naive_attention_on_ragged_batches(block_size, group, kv_heads, dims, seqs, seed):
    """seqs: (new tokens, cached tokens) per sequence; blocks are scattered in a shuffled pool."""
    d, dv = dims
    gen = torch.Generator().manual_seed(seed)
    heads = kv_heads * group
    need = [-(-(q + c) // block_size) for q, c in seqs]
    num_blocks = sum(need) + 3
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    k_cache = torch.full((num_blocks, block_size, kv_heads, d), float("nan"))  # poison unused slots
    v_cache = torch.full((num_blocks, block_size, kv_heads, dv), float("nan"))
    tables, qs, refs, starts, lens = [], [], [], [0], []
    for (q_len, cached), n_blocks in zip(seqs, need):
        total = q_len + cached
        table = [perm.pop() for _ in range(n_blocks)]
        k = torch.randn(total, kv_heads, d, generator=gen)
        v = torch.randn(total, kv_heads, dv, generator=gen)
        for pos in range(total):
            k_cache[table[pos // block_size], pos % block_size] = k[pos]
            v_cache[table[pos // block_size], pos % block_size] = v[pos]
        q = torch.randn(q_len, heads, d, generator=gen)
        refs.append(naive_attention(q, k, v, cached))
        qs.append(q)
        tables.append(table)
        starts.append(starts[-1] + q_len)
        lens.append(total)
    width = max(len(t) for t in tables)
    # Pad block tables with a block whose contents are NaN: masking must keep them out.
    padded = [t + [perm[0]] * (width - len(t)) for t in tables]
    out = paged_attention_ref(
        torch.cat(qs), k_cache, v_cache, torch.tensor(padded), torch.tensor(lens), torch.tensor(starts),
        scale=1.0 / math.sqrt(d),
    )
    assert out.shape == (starts[-1], heads, dv)
    torch.testing.assert_close(out, torch.cat(refs), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("decode", [True, False])
def test_kernels_read_one_runs_columns_of_a_per_head_row_in_place(random_paged_kv, decode):
    """A layer with per-KV-head ranks caches one row of all its heads' dims; each run of equal-rank heads
    is attended through a column view of the pool (zeroc/head_ranks.py). Both Triton kernels read the view
    where it lies, and match the reference on a contiguous copy."""
    from zeroc_kernels.paged_decode import paged_decode_attention
    from zeroc_kernels.paged_prefill import paged_prefill_attention
    from zeroc.head_ranks import HeadLayout

    gen = torch.Generator().manual_seed(7)
    layout = HeadLayout.of((16, 16, 40), (8, 8, 24), group=2)  # runs: 2 heads at (16, 8), 1 at (40, 24)
    lens = [37, 5, 20]
    k_row, v_row, tables = random_paged_kv(gen, lens, 16, 1, 2 * 16 + 40, 2 * 8 + 24, torch.float32)
    q_lens = [1] * 3 if decode else [9, 5, 1]
    starts = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist())
    for run, kv, vv in zip(layout.runs, layout.pool_views(k_row, [16, 40]), layout.pool_views(v_row, [8, 24])):
        assert kv.shape == (k_row.shape[0], 16, run.heads, run.qk) and not kv.is_contiguous()
        assert rows_contiguous(kv).data_ptr() == kv.data_ptr()  # no copy of the pool
        q = torch.randn(sum(q_lens), run.heads * 2, run.qk, generator=gen)
        want = paged_attention_ref(q, kv.contiguous(), vv.contiguous(), tables, torch.tensor(lens), starts, 0.125)
        got = (paged_decode_attention(q, kv, vv, tables, torch.tensor(lens), 0.125) if decode else
               paged_prefill_attention(q, kv, vv, tables, torch.tensor(lens), starts, 0.125))
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
