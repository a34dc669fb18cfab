"""Batched prefill on one thread, streaming each layer's KV out as soon as the layer is computed."""

from __future__ import annotations

import itertools
import logging
import math
import queue
import threading
from dataclasses import dataclass, field

import torch
from torch import Tensor

from kv_store.store import KvStore, PrefixPlan
from zeroc.config import CacheConfig, SchedulerConfig, ThreadsConfig
from zeroc.cpu_threads import enter_engine_thread
from zeroc.caches import paged_cache
from zeroc.kv_cache import PagedBatch, layer_shapes
from zeroc.kv_transfer import KvTransferError, encode_layer_wire
from zeroc.loader import LoadedModel
from zeroc.tier import tier_positions
from zeroc.policies.tier import TokenTier
from zeroc.transport.prefill_side import KvSink

log = logging.getLogger(__name__)

DONE = object()  # queued after a job's last chunk


@dataclass
class PrefillJob:
    """One prompt to prefill; its chunks (serialized PrefillResponses, then DONE, or an Exception)
    arrive on `out`."""

    request_id: str
    token_ids: list[int]
    chunk_bytes: int
    cached_prefix_tokens: int = 0  # the caller has these tokens' KV: stream only later ones
    out: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    kv_bytes: int = 0
    sink: KvSink | None = None  # out-of-band transport (zeroc/transport/); None: in-band chunks
    tenant: str = ""  # whose prefix cache the prompt's blocks belong to ("": the default tenant)
    mac_key: bytes | None = None  # the request's key for in-band chunk MACs (zeroc.stream_mac); None: no MACs
    priority: int = 0  # PrefillRequest.priority: lower is taken first
    order: int = -1  # its place in arrival order, given by the JobQueue it first joins


class JobQueue:
    """Prompts waiting for the worker, taken by priority (lower first), then in arrival order; a job put back
    keeps its place. `put(None)` queues a stop marker, taken after every job (`get` returns None)."""

    def __init__(self):
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._arrivals = itertools.count()

    def put(self, job: PrefillJob | None) -> None:
        if job is None:
            self._queue.put((math.inf, next(self._arrivals), None))
            return
        if job.order < 0:
            job.order = next(self._arrivals)
        self._queue.put((job.priority, job.order, job))

    def get(self, block: bool = True) -> PrefillJob | None:
        """The next job (None: the stop marker); raises queue.Empty when not `block`ing and none waits."""
        return self._queue.get(block)[2]

    def get_nowait(self) -> PrefillJob | None:
        return self.get(False)

    def qsize(self) -> int:
        return self._queue.qsize()


def ship_layer(job: PrefillJob, layer: int, k: Tensor, v: Tensor, first_token: int, tier: bool = False) -> None:
    """Send one layer of one job's KV: in-band chunks, or through the job's out-of-band sink.

    k: [T, kv_heads, k_dim]; v: [T, kv_heads, v_dim] for the job's tokens from `first_token` on. A
    transport failure ends this job only, not the batch it was computed in. `tier`: a token tier's extra
    rows (the sinks and the last `recent` tokens), always in band: a few rows beside KV that may go out
    of band."""
    if job.cancelled.is_set():
        return
    if job.sink is None or tier:  # chunks serialized here, once (zeroc.kv_transfer.encode_layer_wire)
        job.kv_bytes += k.numel() * k.element_size() + v.numel() * v.element_size()
        for wire in encode_layer_wire(layer, k, v, first_token, job.chunk_bytes, tier, job.mac_key):
            job.out.put(wire)
        return
    try:
        for msg in job.sink.layer(layer, k, v, first_token):
            job.kv_bytes += msg.remote.nbytes
            job.out.put(msg)
    except KvTransferError as exc:
        job.cancelled.set()
        job.out.put(exc)


class PrefillWorker:
    """Collects concurrent prompts into one ragged forward (up to the scheduler's token budget)."""

    def __init__(self, loaded: LoadedModel, cache: CacheConfig, scheduler: SchedulerConfig,
                 store: KvStore | None = None, threads: ThreadsConfig | None = None, release_weights: bool = False):
        """`threads`: the worker thread's intra-op threads and cores (None: leave PyTorch's as they are).
        `release_weights`: hold each GEMM's weight once, as the Engine's option of that name says (the service
        does: its process owns the model)."""
        self.model, cfg = loaded.model, loaded.config
        self.threads = threads
        self.kv_store = store  # blocks this service computed, kept for later prompts sharing a prefix
        self.sched = scheduler
        shapes = layer_shapes(cfg)
        param = next(self.model.parameters())
        # the Engine's GEMMs, before the cache takes its share of the memory left
        self.model.prepare_to_serve(release=release_weights)
        self.cache = paged_cache(shapes, cache, param.dtype, param.device, model=self.model)
        self.max_tokens = self.cache.token_capacity(cfg.max_position_embeddings) - 1
        # A token tier (zeroc/policies/tier.py): the model writes [compressed | tier] rows; both are shipped.
        self.tier = self.cache.policy if isinstance(self.cache.policy, TokenTier) else None
        self._pending = JobQueue()
        self._thread = threading.Thread(target=self._run, name="prefill-worker", daemon=True)
        self._thread.start()

    @property
    def num_layers(self) -> int:
        return self.cache.num_layers

    def submit(self, job: PrefillJob) -> None:
        self._pending.put(job)

    def pending(self) -> int:
        return self._pending.qsize()

    def stop(self) -> None:
        self._pending.put(None)
        self._thread.join(timeout=30)

    def _take_batch(self) -> list[PrefillJob] | None:
        """The next batch, in queue order, up to the sequence and token limits; jobs whose callers left are
        dropped as they come out (they take no place in a batch). None: stop."""
        first = self._pending.get()
        while first is not None and first.cancelled.is_set():
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
            if job.cancelled.is_set():
                continue
            if tokens + len(job.token_ids) > min(self.sched.max_num_batched_tokens, self.max_tokens):
                self._pending.put(job)  # back in its place, for the next batch
                break
            batch.append(job)
            tokens += len(job.token_ids)
        return batch

    def _run(self) -> None:
        if self.threads is not None:
            enter_engine_thread(self.threads)
        while (batch := self._take_batch()) is not None:
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

    def _load_prefix(self, job: PrefillJob) -> int:
        """Put the KV of the job's cached prefix that this service's pool holds into its cache blocks;
        returns the tokens loaded (the forward computes from there)."""
        if self.kv_store is None or job.cached_prefix_tokens < self.cache.block_size:
            return 0
        ids = self.kv_store.block_ids(job.token_ids[:job.cached_prefix_tokens], job.tenant)
        n = self.kv_store.pool.held_prefix(ids)
        if not n:
            return 0
        slots = self.cache.schedule([(job.request_id, n * self.cache.block_size)]).slot_mapping
        loaded = self.kv_store.load(PrefixPlan(ids[:n], [None] * n, [0] * n, self.cache.block_size), self.cache, slots)
        if loaded.tokens < n * self.cache.block_size:  # evicted meanwhile: compute the whole prompt
            self.cache.free(job.request_id)
            return 0
        return loaded.tokens

    def _ship_tiered(self, job: PrefillJob, layer: int, k: Tensor, v: Tensor) -> None:
        """A tiered model's rows of one job: the compressed part of every token, the tier part of the tokens
        the decode side's tier keeps (the prompt's sinks and last `recent` tokens). k, v: [T, kv_heads, dim]
        of the job's tokens from its cached prefix on."""
        t, start = self.tier.layers[layer], job.cached_prefix_tokens
        ship_layer(job, layer, k[:, :, : t.k_dim], v[:, :, : t.v_dim], start)
        for r in tier_positions(self.tier.sinks, self.tier.recent, len(job.token_ids)):
            lo = max(r.start, start)
            if lo < r.stop:
                rows = slice(lo - start, r.stop - start)
                ship_layer(job, layer, k[rows, :, t.k_dim:], v[rows, :, t.v_dim:], lo, tier=True)

    def _forward(self, jobs: list[PrefillJob]) -> None:
        first = [self._load_prefix(j) for j in jobs]  # per job: the first position computed here
        batch: PagedBatch = self.cache.schedule([(j.request_id, len(j.token_ids) - f) for j, f in zip(jobs, first)])
        starts = batch.query_start_loc.tolist()

        def emit(layer: int, _slots: Tensor, k: Tensor, v: Tensor) -> None:
            # A KV-write listener (zeroc/kv_cache.py), called once per layer on every backend: k, v: [N, kv_heads,
            # dim] for all jobs; each job gets its own rows from its cached prefix on.
            for i, job in enumerate(jobs):
                lo = starts[i] + job.cached_prefix_tokens - first[i]
                k_job, v_job = k[lo:starts[i + 1]], v[lo:starts[i + 1]]
                if self.tier is None:
                    ship_layer(job, layer, k_job, v_job, job.cached_prefix_tokens)
                else:
                    self._ship_tiered(job, layer, k_job, v_job)

        tokens = torch.tensor([t for j, f in zip(jobs, first) for t in j.token_ids[f:]], device=batch.positions.device)
        with torch.inference_mode(), self.cache.listening(emit):
            # No logits are needed: the decode side computes the last prompt token itself.
            self.model.forward_paged(tokens, batch.positions, batch, self.cache,
                                     logits_indices=torch.empty(0, dtype=torch.long, device=tokens.device))
        if self.kv_store is not None:
            for job in jobs:
                self.kv_store.offer(job.token_ids, self.cache, self.cache.block_table(job.request_id), job.tenant)
        log.info("prefilled", extra={"requests": len(jobs), "tokens": int(tokens.numel()),
                                     "reused_tokens": sum(first)})
