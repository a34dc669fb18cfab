"""Paged attention through torch's FlexAttention: a maintained kernel behind the backend seam.

Issue 17 asks that where a maintained library beats a hand-written kernel on a shape the runtime uses, it be
measured and made a backend. FlexAttention (torch.nn.attention.flex_attention) generates a fused Triton
kernel on CUDA from a block-sparse mask, with a decoding variant for short queries, and ships with torch: no
extra wheel. `flex_paged_attention` has `paged_attention_ref`'s signature and numerics; the `flex` backend
(kernels/attention.py) runs it for plain pools, and `benchmarks/gpu_kernels.py` times it beside the paged
kernels and SDPA.

How the paged cache becomes one FlexAttention call:
- Keys and values are the whole pool viewed as one long sequence, [1, kv_heads, num_blocks * block_size, d],
  with no copy; the batch dim broadcasts over sequences.
- Queries are padded to [B, heads, max_q, d] (a view for decode steps, one query per sequence).
- The block mask's KV block is one cache page. For each (sequence, tile of Q_BLOCK query rows) it lists the
  sequence's pages from its block table: the pages every row of the tile may see in full (no mask evaluated),
  then those it sees in part (the diagonal, the last page). So the kernel reads only the sequence's own pages.
- `mask_mod` is the whole mask, not just the partial pages' part: torch's eager FlexAttention ignores the
  block lists and applies mask_mod to every key in the pool. A key is visible when its page sits in the
  sequence's table at the logical index the page has (`logical_pages`, built each step by a scatter: a
  prefix-shared page has the same logical index in every table that holds it) and its position is neither
  past the query's nor past the context.
- A masked key's weight is 0, but 0 times a stale non-finite value is NaN: the fused kernel reads every slot
  of the pages it lists, a sequence's last page included. So each last page's V slots past the context are
  zeroed first (`zero_page_tails`). Only full pages are ever shared (kv_store/hashing.py), so those slots
  belong to no one else; the next token written there overwrites the zero. Eager FlexAttention reads the
  whole pool and so needs a pool with no non-finite value anywhere: it is for tests, never for serving.
- The block mask, the tails' slots and the prompt rows' indices depend on the step's batch tensors alone, so
  they are built once per step (`plan_flex_step`, the flex backend's `plan`), and every layer reuses them.
The cost is the page size as the kernel's KV tile: 16-token tiles behind an index load, which the paged
decode kernel avoids by gathering several pages a tile. Whether FlexAttention wins anywhere is the GPU
benchmark's question (docs/benchmarks.md); correctness is proved on the CPU against the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, flex_attention

# Query rows per block-mask row for prompts (FlexAttention's default tile); a decode step's one row is one tile.
PREFILL_Q_BLOCK = 128
# Every torch.compile of flex_attention in a process shares dynamo's cache for its code. Past `recompile_limit`
# (8) compiled shapes dynamo quietly runs the eager version, which weighs every slot of the pool (above): slow, and
# NaN on a pool holding a stale NaN. Static shapes (the CPU) meet a new shape at many steps, and each distinct
# layer width is one more compile on CUDA. So calls through `compiled_flex` allow this many, then raise.
RECOMPILE_LIMIT = 64


def compiled_flex(dynamic: bool) -> Callable:
    """flex_attention compiled (the fused kernel), raising torch._dynamo.exc.FailOnRecompileLimitHit where dynamo
    would fall back to eager."""
    compiled = torch.compile(flex_attention, dynamic=dynamic)

    def attend(*args, **kwargs):
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True):
            return compiled(*args, **kwargs)

    return attend


def logical_pages(block_tables: Tensor, num_pages: Tensor, num_blocks: int) -> Tensor:
    """block_tables: [B, max_blocks]; num_pages: [B] pages in use per sequence -> [num_blocks] int32: each page's
    index in the tables that hold it (0 for pages no sequence holds; `paged_mask` checks the table too)."""
    max_blocks = block_tables.shape[1]
    col = torch.arange(max_blocks, device=block_tables.device, dtype=torch.int32)
    in_use = col[None, :] < num_pages[:, None]  # [B, max_blocks]
    # Entries past a table's pages are padding and may name any page: they scatter into a spare last slot.
    dest = torch.where(in_use, block_tables.long(), num_blocks)
    logical = torch.zeros(num_blocks + 1, dtype=torch.int32, device=block_tables.device)
    logical.scatter_(0, dest.flatten(), col.expand_as(dest).flatten())
    return logical[:num_blocks]


def paged_mask(block_tables: Tensor, seq_lens: Tensor, q_lens: Tensor, logical: Tensor, block_size: int
               ) -> Callable:
    """The mask_mod over the pool as one sequence: query row q of sequence b (padded layout, at position
    seq_lens[b] - q_lens[b] + q) sees physical key slot kv when that slot's page is b's page at its logical
    index and the slot's position is <= the query's and < seq_lens[b]."""
    start = seq_lens - q_lens  # [B] position of each sequence's first new token

    def mask_mod(b, h, q_idx, kv_idx):
        page = kv_idx // block_size
        index = logical[page]
        pos = index * block_size + kv_idx % block_size
        owned = block_tables[b, index] == page
        return owned & (pos <= start[b] + q_idx) & (pos < seq_lens[b])

    return mask_mod


def paged_block_mask(block_tables: Tensor, seq_lens: Tensor, q_lens: Tensor, max_q: int, block_size: int,
                     num_blocks: int, q_block: int) -> BlockMask:
    """FlexAttention's block mask for `flex_paged_attention` (shapes there): for each sequence and tile of q_block
    query rows, its fully visible pages, then its partly visible ones, read from its block table on the device."""
    num_seqs, max_blocks = block_tables.shape
    device = block_tables.device
    tables = block_tables.to(torch.int32)
    num_pages = (seq_lens + block_size - 1) // block_size  # [B]
    tiles = -(-max_q // q_block)
    first = torch.arange(tiles, device=device) * q_block  # [tiles] first row of each tile
    last = torch.minimum(first[None, :] + q_block, q_lens[:, None]) - 1  # [B, tiles] last real row
    start = (seq_lens - q_lens)[:, None]
    live = last >= first[None, :]  # tiles past a sequence's queries see nothing
    # Page j is seen whole by every row of the tile when its last slot is at or before the tile's first position.
    full = torch.where(live, torch.minimum((start + first[None, :] + 1) // block_size, num_pages[:, None]), 0)
    seen = torch.where(live, (start + last) // block_size + 1, 0)  # pages the tile's last row reaches
    col = torch.arange(max_blocks, device=device)
    partial_cols = (full[..., None] + col).clamp(max=max_blocks - 1)  # [B, tiles, max_blocks]
    partial = tables.gather(1, partial_cols.view(num_seqs, -1)).view(num_seqs, 1, tiles, max_blocks)
    whole = tables[:, None, None, :].expand(-1, 1, tiles, -1)
    if device.type == "cpu":  # inductor's CPU kernel wants a column per pool page (the lists' tails go unread)
        partial, whole = (F.pad(x, (0, max(0, num_blocks - max_blocks))) for x in (partial, whole))
    return BlockMask.from_kv_blocks(
        (seen - full).to(torch.int32)[:, None], partial, full.to(torch.int32)[:, None], whole,
        BLOCK_SIZE=(q_block, block_size),
        mask_mod=paged_mask(block_tables, seq_lens, q_lens, logical_pages(block_tables, num_pages, num_blocks),
                            block_size),
        seq_lengths=(max_q, num_blocks * block_size), compute_q_blocks=False)


def page_tails(block_tables: Tensor, seq_lens: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    """block_tables: [B, max_blocks]; seq_lens: [B] -> (slots [B * block_size]: every slot of each sequence's last
    page, in pool order; stale [B * block_size]: which of them lie past its context), on the device."""
    num_pages = (seq_lens + block_size - 1) // block_size  # [B]
    last = block_tables.gather(1, (num_pages - 1).clamp(min=0)[:, None].long())[:, 0].long()  # [B]
    offset = torch.arange(block_size, device=block_tables.device)
    stale = offset[None, :] >= (seq_lens - (num_pages - 1) * block_size)[:, None]  # [B, block_size]; none if full
    return (last[:, None] * block_size + offset).flatten(), stale.flatten()


def zero_page_tails(v_cache: Tensor, slots: Tensor, stale: Tensor) -> None:
    """v_cache: [num_blocks, block_size, kv_heads, dv]; (slots, stale) from `page_tails`. Zeroes the stale slots in
    place, on the device (no host sync: a boolean index would read the count back)."""
    rows = v_cache.view(-1, *v_cache.shape[2:])  # [slots, kv_heads, dv]
    rows.index_put_((slots,), torch.where(stale[:, None, None], 0, rows[slots]))


@dataclass(frozen=True)
class FlexStep:
    """What `flex_paged_attention` derives from a step's batch tensors alone: built once per step, read by every
    layer (some 20 small device ops, which would otherwise run again in each layer)."""

    decode: bool  # one query per sequence: the queries are a view, the output a slice
    mask: BlockMask
    tail_slots: Tensor  # [B * block_size] each sequence's last page's slots (page_tails)
    tail_stale: Tensor  # [B * block_size]
    q_rows: Tensor | None = None  # [B, max_q] prompts: the token behind each padded query row
    out_seq: Tensor | None = None  # [N] prompts: each token's sequence ...
    out_row: Tensor | None = None  # [N] ... and its row there


def plan_flex_step(block_tables: Tensor, seq_lens: Tensor, query_start_loc: Tensor, num_tokens: int,
                   block_size: int, num_blocks: int, max_q: int | None = None) -> FlexStep:
    """The FlexStep of a step of num_tokens queries (shapes at `flex_paged_attention`). max_q: the most queries
    of one sequence, read from the device when None."""
    q_lens = query_start_loc[1:] - query_start_loc[:-1]  # [B]
    if max_q is None:
        max_q = int(q_lens.max())
    decode = num_tokens == block_tables.shape[0] and max_q == 1
    mask = paged_block_mask(block_tables, seq_lens, q_lens, max_q, block_size, num_blocks,
                            1 if decode else PREFILL_Q_BLOCK)
    tails = page_tails(block_tables, seq_lens, block_size)
    if decode:
        return FlexStep(True, mask, *tails)
    # Row j of sequence b is token query_start_loc[b] + j; rows past q_lens[b] repeat a token and are dropped after.
    row = torch.arange(max_q, device=query_start_loc.device)
    q_rows = (query_start_loc[:-1, None] + row[None, :]).clamp(max=num_tokens - 1)  # [B, max_q]
    # Token n is row n - query_start_loc[b] of its sequence b: gathered by index, since a boolean mask would sync.
    token = torch.arange(num_tokens, device=query_start_loc.device)
    out_seq = torch.searchsorted(query_start_loc[1:], token, right=True)  # [N]
    return FlexStep(False, mask, *tails, q_rows, out_seq, token - query_start_loc[out_seq])


def flex_paged_attention(
    q: Tensor,  # [N, heads, dq] new queries of all sequences, concatenated
    k_cache: Tensor,  # [num_blocks, block_size, kv_heads, dq]
    v_cache: Tensor,  # [num_blocks, block_size, kv_heads, dv]
    block_tables: Tensor,  # [B, max_blocks]
    seq_lens: Tensor,  # [B] context length per sequence, new tokens included
    query_start_loc: Tensor,  # [B + 1] offsets of each sequence's queries in N
    scale: float,
    max_q: int | None = None,  # the most queries of one sequence (read from the device when None)
    attend: Callable = flex_attention,  # flex_attention (eager: tests), or `compiled_flex`'s (the fused kernel)
    step: FlexStep | None = None,  # plan_flex_step's for these batch tensors (built here when None)
) -> Tensor:
    """`paged_attention_ref` through FlexAttention (see the module docstring) -> [N, heads, dv]."""
    num_blocks, block_size, kv_heads, _ = k_cache.shape
    if step is None:
        step = plan_flex_step(block_tables, seq_lens, query_start_loc, q.shape[0], block_size, num_blocks, max_q)
    q_pad = q[:, :, None] if step.decode else q[step.q_rows].transpose(1, 2)  # [B, heads, max_q, dq]
    zero_page_tails(v_cache, step.tail_slots, step.tail_stale)
    keys = k_cache.view(1, num_blocks * block_size, kv_heads, -1).transpose(1, 2)  # [1, kv_heads, slots, dq]
    values = v_cache.view(1, num_blocks * block_size, kv_heads, -1).transpose(1, 2)  # [1, kv_heads, slots, dv]
    out = attend(q_pad, keys.to(q.dtype), values.to(q.dtype), block_mask=step.mask, scale=scale,
                 enable_gqa=True)  # [B, heads, max_q, dv]
    if step.decode:
        return out[:, :, 0]
    return out.transpose(1, 2)[step.out_seq, step.out_row]  # [N, heads, dv]
