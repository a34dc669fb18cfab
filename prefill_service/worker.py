"""Batched prefill on one thread, streaming each layer's KV out as soon as the layer is computed."""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field

import torch
from torch import Tensor

from zeroc.config import CacheConfig, SchedulerConfig
from zeroc.kv_cache import PagedBatch, PagedKVCache, layer_shapes
from zeroc.kv_transfer import encode_layer
from zeroc.loader import LoadedModel
from zeroc.v1 import prefill_pb2

log = logging.getLogger(__name__)

DONE = object()  # queued after a job's last chunk


@dataclass
class PrefillJob:
    """One prompt to prefill; its chunks (then DONE, or an Exception) arrive on `out`."""

    request_id: str
    token_ids: list[int]
    chunk_bytes: int
    out: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    kv_bytes: int = 0


class _StreamingCache(PagedKVCache):
    """A paged cache that also hands every layer's freshly written K/V to `on_write`."""

    on_write = None  # set per forward: (layer, k [N, kv_heads, k_dim], v [N, kv_heads, v_dim]) -> None

    def write(self, layer: int, slot_mapping: Tensor, k: Tensor, v: Tensor) -> None:
        super().write(layer, slot_mapping, k, v)
        if self.on_write is not None:
            self.on_write(layer, k, v)


class PrefillWorker:
    """Collects concurrent prompts into one ragged forward (up to the scheduler's token budget)."""

    def __init__(self, loaded: LoadedModel, cache: CacheConfig, scheduler: SchedulerConfig):
        self.model, cfg = loaded.model, loaded.config
        self.sched = scheduler
        shapes = layer_shapes(cfg)
        param = next(self.model.parameters())
        self.cache = _StreamingCache(shapes, cache, param.dtype, param.device)
        self.max_tokens = self.cache.token_capacity(cfg.max_position_embeddings) - 1
        self._pending: queue.Queue[PrefillJob | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="prefill-worker", daemon=True)
        self._thread.start()

    def submit(self, job: PrefillJob) -> None:
        self._pending.put(job)

    def pending(self) -> int:
        return self._pending.qsize()

    def stop(self) -> None:
        self._pending.put(None)
        self._thread.join(timeout=30)

    def _take_batch(self) -> list[PrefillJob] | None:
        first = self._pending.get()
        if first is None:
            return None
        batch, tokens = [first], len(first.token_ids)
        while len(batch) < self.sched.max_num_seqs:
            try:
                job = self._pending.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self._pending.put(None)  # keep the stop marker for the next round
                break
            if tokens + len(job.token_ids) > min(self.sched.max_num_batched_tokens, self.max_tokens):
                self._pending.put(job)  # order among later jobs does not matter for correctness
                break
            batch.append(job)
            tokens += len(job.token_ids)
        return [j for j in batch if not j.cancelled.is_set()]

    def _run(self) -> None:
        while (batch := self._take_batch()) is not None:
            if not batch:
                continue
            try:
                self._forward(batch)
                for job in batch:
                    job.out.put(DONE)
            except Exception as exc:  # a failed forward must not kill the worker; callers get the error
                log.exception("prefill batch failed")
                for job in batch:
                    job.out.put(exc)
            finally:
                for job in batch:
                    self.cache.free(job.request_id)

    def _forward(self, jobs: list[PrefillJob]) -> None:
        batch: PagedBatch = self.cache.schedule([(j.request_id, len(j.token_ids)) for j in jobs])
        starts = batch.query_start_loc.tolist()

        def emit(layer: int, k: Tensor, v: Tensor) -> None:
            # k, v: [N, kv_heads, dim] for all jobs; each job gets its own rows, chunked.
            for i, job in enumerate(jobs):
                if job.cancelled.is_set():
                    continue
                for chunk in encode_layer(layer, k[starts[i]:starts[i + 1]], v[starts[i]:starts[i + 1]], 0,
                                          job.chunk_bytes):
                    job.kv_bytes += len(chunk.data)
                    job.out.put(prefill_pb2.PrefillResponse(chunk=chunk))

        tokens = torch.tensor([t for j in jobs for t in j.token_ids], device=batch.positions.device)
        self.cache.on_write = emit
        try:
            with torch.inference_mode():
                # No logits are needed: the decode side computes the last prompt token itself.
                self.model.forward_paged(tokens, batch.positions, batch, self.cache,
                                         logits_indices=torch.empty(0, dtype=torch.long, device=tokens.device))
        finally:
            self.cache.on_write = None
        log.info("prefilled", extra={"requests": len(jobs), "tokens": int(tokens.numel())})
