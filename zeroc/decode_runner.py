"""Decode-only steps as a pure function of static device buffers, replayed as CUDA graphs per batch bucket.

A decode step's inputs all live in the persistent batch (zeroc/input_batch.py): each row's next token,
its length and its block table, at fixed addresses. `DecodeRunner` pads the step's n rows to a bucket
(1, 2, 4, 8, ... up to the engine's max_num_seqs) and runs the model on the bucket's rows: positions
and slots are computed inside from the lengths and tables, so the whole forward depends on nothing
but those buffers. On CUDA (unless enforce_eager) it captures one graph per bucket the first time the
bucket is used and replays it afterwards: one launch per step instead of hundreds.

Pad rows (n..bucket) must not touch real KV: each has length 1 and a block table that points at a
scratch block the runner holds for itself (its slot 0 takes their K/V; they attend to it alone). Their
logits are discarded. On the CPU the same padded path runs eagerly (tests check it against the
unpadded one); graphs are used only where they can be captured.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from zeroc.input_batch import InputBatch
from zeroc.kv_cache import PagedBatch, PagedKVCache

log = logging.getLogger(__name__)

PAD_SEQUENCE = "\0decode-runner-pad"  # the cache sequence that owns the pad rows' scratch block


def buckets(max_seqs: int) -> list[int]:
    """Batch sizes graphs are captured for: powers of two below max_seqs, and max_seqs."""
    out, b = [], 1
    while b < max_seqs:
        out.append(b)
        b *= 2
    return out + [max_seqs]


def graphs_supported(model, cache: PagedKVCache) -> bool:
    """CUDA, and a decode step that a graph can hold (`graph_safe`)."""
    return next(model.parameters()).is_cuda and graph_safe(model, cache)


def graph_safe(model, cache: PagedKVCache) -> bool:
    """Whether a decode step reads nothing back to the host and keeps its shapes, whatever the device: a backend
    that says so (`AttentionBackend.graph_safe`: triton, flex) over a plain cache or pools that say so
    (`PolicyPools.graph_safe`: int8's, a token tier's)."""
    if cache.pools is not None and not cache.pools.graph_safe:
        return False
    return model.backend.graph_safe


class DecodeRunner:
    def __init__(self, model, cache: PagedKVCache, state: InputBatch, use_graphs: bool, pad: bool | None = None):
        """use_graphs: capture and replay (CUDA only). pad: pad to buckets (default: with graphs; a test
        turns it on alone to run the graphed function eagerly)."""
        self.model, self.cache, self.state = model, cache, state
        self.use_graphs = use_graphs
        self.pad = use_graphs if pad is None else pad
        self.buckets = buckets(state.max_seqs)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self._pool = None
        self.pad_block = None
        if self.pad:
            cache.append_slots([(PAD_SEQUENCE, 1)])
            self.pad_block = cache.block_table(PAD_SEQUENCE)[0]

    def close(self) -> None:
        """Give the scratch block back and drop the graphs."""
        self.cache.free(PAD_SEQUENCE)
        self.graphs.clear()

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def forward(self, rows: int, width: int | None = None) -> Tensor:
        """Logits [rows, vocab] of one new token for each of the first `rows` rows of the persistent batch:
        a pure function of its buffers (the graphed function)."""
        s = self.state
        pos, slots, tables = s.decode_slots(rows, width)
        batch = PagedBatch(positions=pos, slot_mapping=slots, block_tables=tables, seq_lens=s.seq_lens[:rows],
                           query_start_loc=s.arange[: rows + 1], last_token_indices=s.arange[:rows], max_query_len=1)
        return self.model.forward_paged(s.token_ids[:rows], pos, batch, self.cache)

    def run(self, n: int) -> Tensor:
        """Logits [n, vocab] for the first n rows, all decoding."""
        if not self.pad:
            return self.forward(n, self.state.width())
        b = self.bucket(n)
        self._fill_pad(n, b)
        if not self.use_graphs:
            return self.forward(b)[:n]
        if b not in self.graphs:
            try:
                self.graphs[b] = self._capture(b)
            except Exception:  # a kernel that cannot be captured: run eagerly from now on
                log.warning("CUDA graph capture failed; decode steps run eagerly", exc_info=True)
                self.use_graphs = False
                return self.forward(b)[:n]
        graph, logits = self.graphs[b]
        graph.replay()
        return logits[:n]

    def _fill_pad(self, n: int, b: int) -> None:
        if b > n:
            s = self.state
            s.seq_lens[n:b] = 1
            s.token_ids[n:b] = 0
            s.block_tables[n:b, 0] = self.pad_block

    def _capture(self, b: int) -> tuple[torch.cuda.CUDAGraph, Tensor]:
        # Warm up on a side stream first (Triton compiles, cuBLAS picks its kernels); this runs the real
        # step once, which writes the same K/V into the same slots as the replay that follows.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.forward(b)
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self.forward(b)
        log.info("captured a decode graph", extra={"batch": b})
        return graph, logits
