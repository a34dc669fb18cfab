"""int8 in the paged serving cache: equal to the streaming evaluator (also on a ZeroC model), bytes by
hand, pools in exactly the paged attention kernels' layout, and a prompt's KV from a prefill worker
encoded on arrival."""

from __future__ import annotations

import pytest
import torch

from zeroc_kernels.kv_quant import quantize_rows_ref
from zeroc_kernels.paged_decode import paged_decode_attention
from zeroc_kernels.paged_prefill import paged_prefill_attention
from serving_runs import BUNDLED, check_landed_is_colocated, check_serving_is_the_policy
from zeroc.config import CacheConfig
from zeroc.caches import paged_cache
from zeroc.kv_cache import LayerShape, block_bytes
from zeroc.loader import load_model
from zeroc.policies import make_policy
from zeroc.policies.int8 import Int8


@pytest.fixture(scope="module")
def zeroc_half(zeroc_half_dir):
    return load_model(zeroc_half_dir)


@pytest.fixture(scope="module")
def zeroc_heads(zeroc_heads_dir):
    return load_model(zeroc_heads_dir)


@pytest.mark.parametrize("model_name,prompt,chunks", [
    ("bundled", 40, [[40], [13, 1, 26]]),  # prompt chunks that start and end inside blocks
    ("zeroc_half", 37, [[37], [16, 21]]),  # stacked on ZeroC: the rows are the compressed widths (32)
    ("zeroc_heads", 33, [[33], [5, 28]]),  # per-KV-head ranks: one row of every head's dims, one scale
])
def test_serving_equals_the_streaming_evaluator(request, heldout_ids, model_name, prompt, chunks):
    # One int8 code can round the other way where the two paths sum a row in another order (1.4-3.5e-4 in the
    # logits on an Intel Xeon host, below 1e-4 on AMD EPYC); the gap check is what tells int8 apart.
    check_serving_is_the_policy(request.getfixturevalue(model_name), Int8(), heldout_ids[:prompt], 8, chunks,
                                atol=5e-4, block_size=16, num_blocks=16, kv_policy="int8")


def test_block_bytes_and_blocks_per_budget_by_hand():
    # Per layer and token: 2 heads x (64 + 64) int8 codes + 2 heads x 2 fp32 scales = 272 bytes.
    assert Int8().block_bytes(BUNDLED, 16, torch.float32) == 6 * 16 * 272
    half = [LayerShape(2, 32, 32)] * 6  # ZeroC at rank 32: 2 x 64 + 2 x 2 x 4 = 144 bytes
    assert Int8().block_bytes(half, 16, torch.float32) == 6 * 16 * 144
    budget = 1 << 20
    cache = paged_cache(BUNDLED, CacheConfig(block_size=16, num_bytes=budget, kv_policy="int8"), torch.bfloat16)
    assert cache.num_blocks == budget // (6 * 16 * 272)
    held = sum(p.numel() * p.element_size() for layer in cache.pools.layers for p in layer.values())
    assert held == cache.num_blocks * 6 * 16 * 272  # the pools really are that size
    # bf16 plain: 16 x 6 x 2 x 128 x 2 = 49152 bytes a block, int8 26112: 1.88x the tokens per byte
    assert block_bytes(BUNDLED, 16, torch.bfloat16) / Int8().block_bytes(BUNDLED, 16, torch.bfloat16) \
        == pytest.approx(49152 / 26112)


def test_kv_from_an_int8_prefill_lands_encoded_and_decodes_like_colocated(zeroc_half, heldout_ids):
    cfg = CacheConfig(block_size=16, num_blocks=32, kv_policy="int8")
    ids = heldout_ids[:45]
    check_landed_is_colocated(zeroc_half, cfg, ids, held_blocks=3)  # 44 tokens, nothing borrowed


def test_int8_takes_no_kivi_or_h2o_settings():
    with pytest.raises(ValueError, match="does not apply to int8"):
        make_policy(CacheConfig(kv_policy="int8", kv_budget=0.5))
    with pytest.raises(ValueError, match="h2o only"):
        make_policy(CacheConfig(kv_policy="int8", kv_max_tokens=8))
    with pytest.raises(ValueError, match="kivi-4 and kivi-2 only"):
        make_policy(CacheConfig(kv_policy="int8", kv_residual=16))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_the_pools_are_the_kernels_layout_and_the_triton_kernels_read_them(dtype, tol):
    """Codes and scales sit where `kv_quant`'s reference puts each token's slot in the kernels' pools, and the
    Triton prefill and decode kernels (interpreter) given the store's pools return what `attend` returned
    (the CPU reference), in the query dtype; KV from the wire lands the same way."""
    shape, bs = LayerShape(kv_heads=2, k_dim=24, v_dim=16), 16  # ZeroC-like: q/k and v widths differ
    cache = paged_cache([shape], CacheConfig(block_size=bs, num_blocks=8, kv_policy="int8"), dtype)
    pools, gen = cache.pools.layers[0], torch.Generator().manual_seed(0)
    # scales are stored head-major (one KV head's slots of a block side by side), seen in the logical shape
    assert pools["k_scales"].shape == (8, bs, 2) and pools["k_scales"].stride() == (2 * bs, 1, bs)
    want = {"k_codes": torch.zeros(8, bs, 2, 24, dtype=torch.int8), "k_scales": torch.zeros(8, bs, 2),
            "v_codes": torch.zeros(8, bs, 2, 16, dtype=torch.int8), "v_scales": torch.zeros(8, bs, 2)}

    def place(seq: str, first: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Quantise rows of positions [first, first + n) of `seq` into `want`, by hand from its table."""
        table = cache.block_table(seq)
        for i, (kc, ks, vc, vs) in enumerate(zip(*quantize_rows_ref(k), *quantize_rows_ref(v))):
            block, off = table[(first + i) // bs], (first + i) % bs
            want["k_codes"][block, off], want["k_scales"][block, off] = kc, ks
            want["v_codes"][block, off], want["v_scales"][block, off] = vc, vs

    # ragged prefill, a decode-only step, then a step mixing a decode with a prefill chunk across a block edge
    for steps in ([("a", 21), ("b", 5)], [("a", 1), ("b", 1)], [("a", 1), ("b", 12)]):
        firsts = [cache.seq_len(s) for s, _ in steps]
        batch = cache.schedule(steps)
        n = batch.positions.shape[0]
        q, k, v = (torch.randn(n, h, d, generator=gen).to(dtype) for h, d in ((4, 24), (2, 24), (2, 16)))
        cache.write(0, batch.slot_mapping, k, v)
        out = cache.pools.attend(0, q, batch, 0.2)
        assert out.dtype == dtype and out.shape == (n, 4, 16)
        rows = batch.query_start_loc.tolist()
        for (seq, _), first, lo, hi in zip(steps, firsts, rows, rows[1:]):
            place(seq, first, k[lo:hi], v[lo:hi])
        for name, pool in want.items():
            assert torch.equal(pools[name], pool), name
        scales = dict(k_scales=pools["k_scales"], v_scales=pools["v_scales"])
        if n == len(steps):
            tri = paged_decode_attention(q, pools["k_codes"], pools["v_codes"], batch.block_tables, batch.seq_lens,
                                         0.2, **scales)
        else:
            tri = paged_prefill_attention(q, pools["k_codes"], pools["v_codes"], batch.block_tables, batch.seq_lens,
                                          batch.query_start_loc, 0.2, **scales)
        assert tri.dtype == dtype
        torch.testing.assert_close(tri.float(), out.float(), atol=tol, rtol=tol)

    cache.schedule([("c", 10)])
    k, v = torch.randn(10, 2, 24, generator=gen), torch.randn(10, 2, 16, generator=gen)  # fp32 from the wire
    cache.load("c", 0, k, v)
    place("c", 0, k.to(dtype), v.to(dtype))  # rounded to the cache dtype first, as colocated rows are
    for name, pool in want.items():
        assert torch.equal(pools[name], pool), name
