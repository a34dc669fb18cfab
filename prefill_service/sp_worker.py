"""Sequence-parallel prefill inside the prefill service: each prompt runs on P gloo processes.

``zeroc serve prefill --sp P`` runs rank 0 in the service process (the thread of
`SpPrefillWorker`) and starts ranks 1..P-1 as ``python -m prefill_service.sp_worker`` children.
Per prompt, rank 0 broadcasts the token ids; every rank runs `sp_prefill` on its contiguous
shard (one all-to-all each way per layer); each layer's keys (after RoPE) and values of every
shard are gathered to rank 0, which ships them like any prefill's KV (`ship_layer`: in-band
chunks or an out-of-band sink), so the decode side cannot tell the difference. Prompts run one at
a time, each on all ranks. A rank that dies breaks the group for good: later requests get
UNAVAILABLE.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import socket
import subprocess
import sys
import threading
from typing import Callable

import grpc
import torch
import torch.distributed as dist
from torch import Tensor

from prefill_service.worker import DONE, JobQueue, PrefillJob, ship_layer
from zeroc.config import ThreadsConfig
from zeroc.cpu_threads import enter_engine_thread
from zeroc.kv_transfer import KvTransferError
from zeroc.loader import LoadedModel, load_model
from zeroc.parallel.sequence_parallel import shard_bounds, sp_prefill

log = logging.getLogger(__name__)


class _GatherKv:
    """A `sp_prefill` KV hook: gathers every rank's shard of each layer to rank 0 (one gather per layer)."""

    def __init__(self, lens: list[int], rank: int, on_layer: Callable[[int, Tensor, Tensor], None] | None):
        self.lens, self.rank, self.on_layer = lens, rank, on_layer

    def __call__(self, layer: int, k: Tensor, v: Tensor) -> None:
        # k: [T_rank, kv_heads, dq]; v: [T_rank, kv_heads, dv] -> one padded row block per rank
        rows = torch.cat([k.flatten(1), v.flatten(1)], 1)
        padded = rows.new_zeros(max(self.lens), rows.shape[1])
        padded[: rows.shape[0]] = rows
        if self.rank != 0:
            dist.gather(padded, dst=0)
            return
        parts = [torch.empty_like(padded) for _ in self.lens]
        dist.gather(padded, parts, dst=0)
        full = torch.cat([p[:n] for p, n in zip(parts, self.lens)])  # [T, kv_heads * (dq + dv)]
        heads, dq = k.shape[1], k.shape[2]
        self.on_layer(layer, full[:, : heads * dq].view(-1, heads, dq), full[:, heads * dq:].view(-1, heads, v.shape[2]))


def _exchange_prompt(tokens: list[int] | None) -> Tensor | None:
    """Rank 0 passes its prompt (None: stop); every rank returns it ([T] token ids) or None."""
    header = torch.tensor([len(tokens) if tokens else 0])
    dist.broadcast(header, src=0)
    if int(header) == 0:
        return None
    ids = torch.tensor(tokens) if tokens else torch.empty(int(header), dtype=torch.long)
    dist.broadcast(ids, src=0)
    return ids


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SpPrefillWorker:
    """The PrefillWorker interface (submit, pending, stop, max_tokens, num_layers) over P ranks."""

    def __init__(self, loaded: LoadedModel, world: int, dtype: str, timeout_s: float,
                 threads: ThreadsConfig | None = None):
        """`threads`: rank 0's thread's intra-op threads (None: leave PyTorch's as they are)."""
        self.threads = threads
        cfg = loaded.config
        if not 2 <= world <= cfg.num_attention_heads:
            raise ValueError(f"--sp must be in [2, {cfg.num_attention_heads}] (the model's query heads), got {world}")
        if cfg.has_tier:
            raise ValueError("--sp splits plain causal attention over ranks; it does not run a model's token tier "
                             "(calibrated with --sinks/--recent)")
        self.model, self.world = loaded.model, world
        self.max_tokens = cfg.max_position_embeddings - 1
        self.num_layers = cfg.num_hidden_layers
        self.broken: str | None = None
        init = f"tcp://127.0.0.1:{_free_port()}"
        env = {**os.environ, "ZEROC_EXIT_WITH_PARENT": str(os.getpid())}
        self._procs = [subprocess.Popen([sys.executable, "-m", "prefill_service.sp_worker", "--rank", str(r),
                                         "--world", str(world), "--init", init, "--model", str(loaded.path),
                                         "--dtype", dtype, "--timeout-s", str(timeout_s)], env=env)
                       for r in range(1, world)]
        dist.init_process_group("gloo", init_method=init, rank=0, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
        self._pending = JobQueue()  # by priority, then arrival
        self._thread = threading.Thread(target=self._run, name="sp-prefill", daemon=True)
        self._thread.start()
        log.info("sequence-parallel prefill ready", extra={"ranks": world})

    def submit(self, job: PrefillJob) -> None:
        self._pending.put(job)

    def pending(self) -> int:
        return self._pending.qsize()

    def _run(self) -> None:
        if self.threads is not None:  # `zeroc serve` left every other thread single-threaded
            enter_engine_thread(self.threads)
        while (job := self._pending.get()) is not None:
            if self.broken:
                job.out.put(KvTransferError(grpc.StatusCode.UNAVAILABLE, self.broken))
                continue
            if job.cancelled.is_set():
                continue
            try:
                tokens = _exchange_prompt(job.token_ids)
                c = job.cached_prefix_tokens  # computed again here (no reuse across SP ranks), not shipped
                hook = _GatherKv(shard_bounds(len(job.token_ids), self.world), 0,
                                 lambda layer, k, v: ship_layer(job, layer, k[c:], v[c:], c))
                sp_prefill(self.model, tokens, 0, self.world, on_kv=hook)
                job.out.put(DONE)
            except Exception as exc:  # a collective failed: the group cannot resynchronise
                log.exception("sequence-parallel prefill failed")
                self.broken = f"sequence-parallel prefill is broken ({exc}); restart the service"
                job.out.put(KvTransferError(grpc.StatusCode.UNAVAILABLE, self.broken))

    def stop(self) -> None:
        self._pending.put(None)
        self._thread.join(timeout=30)
        if not self.broken:
            try:
                _exchange_prompt(None)  # tells the other ranks to exit
            except RuntimeError:
                pass
        for p in self._procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        dist.destroy_process_group()


def _rank_main(argv: list[str] | None = None) -> int:
    """Ranks 1..P-1: follow rank 0's prompts until it says stop."""
    parser = argparse.ArgumentParser(description="a sequence-parallel prefill rank (started by the service)")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--init", required=True, help="tcp://HOST:PORT of rank 0's rendezvous")
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--timeout-s", type=float, default=120.0)
    args = parser.parse_args(argv)
    if os.environ.get("ZEROC_EXIT_WITH_PARENT"):
        from zeroc.rpc import stop_with_parent

        stop_with_parent(int(os.environ["ZEROC_EXIT_WITH_PARENT"]))
    model = load_model(args.model, args.dtype).model
    dist.init_process_group("gloo", init_method=args.init, rank=args.rank, world_size=args.world,
                            timeout=datetime.timedelta(seconds=args.timeout_s))
    try:
        while (tokens := _exchange_prompt(None)) is not None:
            sp_prefill(model, tokens, args.rank, args.world,
                       on_kv=_GatherKv(shard_bounds(tokens.numel(), args.world), args.rank, None))
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(_rank_main())
