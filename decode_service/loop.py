"""The engine loop: one thread owns the Engine; request handler threads talk to it through tickets.

Admission: a request holds a queue place from acceptance until its first token (or its end);
past `max_queue` places new requests are refused. Disaggregated requests also reserve cache
slots for their prompt before fetching its KV; they wait here while the cache is full.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

import torch

from zeroc.engine import Engine, StepOutput
from zeroc.sampling import SamplingParams

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """More requests are waiting than the queue limit allows."""


class ShuttingDownError(RuntimeError):
    """The service is draining and takes no new requests."""


class CancelledError(RuntimeError):
    """The caller went away while its request waited."""


@dataclass
class Ticket:
    """One accepted request. Its outputs (StepOutput, or an Exception) arrive on `out`."""

    key: str  # the engine's request id: unique per ticket, whatever id the client sent
    out: queue.Queue = field(default_factory=queue.Queue)
    queued: bool = True  # holds a queue place (until its first token or its end)
    reserve_wait_s: float = 0.0  # time spent in `reserve` waiting for cache space


@dataclass(frozen=True)
class LoopStats:
    blocks_total: int
    blocks_free: int
    block_size: int
    running: int
    queued: int


class EngineLoop:
    def __init__(self, engine: Engine, max_queue: int):
        self.engine = engine
        self.max_queue = max_queue
        self._cond = threading.Condition()
        self._tickets: dict[str, Ticket] = {}
        self._queued = 0
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    # -- called by request handler threads -----------------------------------------------------
    def admit(self) -> Ticket:
        with self._cond:
            if self._stopping:
                raise ShuttingDownError("the service is shutting down")
            if self._queued >= self.max_queue:
                raise QueueFullError(f"{self._queued} requests are already queued (limit {self.max_queue}); "
                                     "retry later or use another replica")
            self._queued += 1
            return Ticket(key=uuid.uuid4().hex)

    def reserve(self, ticket: Ticket, num_tokens: int, is_active: Callable[[], bool]) -> torch.Tensor:
        """Wait until the cache can hold `num_tokens` prompt tokens, then take their slots: [num_tokens]."""
        cache = self.engine.cache
        # Leave a block of growth per running sequence so receiving KV does not force preemption.
        need = cache.blocks_needed(ticket.key, num_tokens + 1)
        started = time.monotonic()
        with self._cond:
            while cache.num_free_blocks - len(self.engine.running) < need:
                if self._stopping:
                    raise ShuttingDownError("the service is shutting down")
                if not is_active():
                    raise CancelledError("cancelled while waiting for KV cache space")
                self._cond.wait(0.1)
            ticket.reserve_wait_s = time.monotonic() - started
            return self.engine.reserve(ticket.key, num_tokens)

    def unreserve(self, ticket: Ticket) -> None:
        """Give back the slots `reserve` took (the request itself stays admitted)."""
        with self._cond:
            self.engine.abort(ticket.key)
            self._cond.notify_all()

    def run_locked(self, fn: Callable[[], None]) -> None:
        """Run `fn` between engine steps and releases (e.g. encoding received KV into the cache)."""
        with self._cond:
            fn()

    def submit(self, ticket: Ticket, ids: list[int], params: SamplingParams, cached_tokens: int) -> None:
        with self._cond:
            if self._stopping:
                raise ShuttingDownError("the service is shutting down")
            self.engine.add_request(ids, params, ticket.key, cached_tokens=cached_tokens)
            self._tickets[ticket.key] = ticket
            self._cond.notify_all()

    def release(self, ticket: Ticket) -> None:
        """Forget a request in any state and free its blocks now. Idempotent."""
        with self._cond:
            self.engine.abort(ticket.key)
            self._tickets.pop(ticket.key, None)
            self._unqueue(ticket)
            self._cond.notify_all()

    def stats(self) -> LoopStats:
        with self._cond:
            c = self.engine.cache
            return LoopStats(c.num_blocks, c.num_free_blocks, c.block_size, len(self.engine.running), self._queued)

    def load(self) -> tuple[int, int]:
        """(running, queued) read without the lock, for metrics: the loop thread re-takes the lock right after
        each step, so a reader that waits for it may wait until the load is gone."""
        return len(self.engine.running), self._queued

    def stop(self) -> None:
        """Stop stepping; requests still in flight end with finish reason "abort"."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout=30)
        with self._cond:
            for ticket in list(self._tickets.values()):
                self.engine.abort(ticket.key)
                ticket.out.put(StepOutput(ticket.key, [], "", True, "abort"))
            self._tickets.clear()

    # -- the loop thread -------------------------------------------------------------------------
    def _unqueue(self, ticket: Ticket) -> None:
        if ticket.queued:
            ticket.queued = False
            self._queued -= 1

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self.engine.has_unfinished():
                    self._cond.wait()
                if self._stopping:
                    return
                try:
                    outs = self.engine.step()
                except Exception as exc:  # keep serving: fail the requests this step concerned, free their blocks
                    log.exception("engine step failed")
                    self._fail_step(exc)
                    continue
                for out in outs:
                    ticket = self._tickets.get(out.request_id)
                    if ticket is None:
                        continue
                    self._unqueue(ticket)
                    ticket.out.put(out)
                    if out.finished:
                        del self._tickets[out.request_id]
                self._cond.notify_all()
            if not outs:
                time.sleep(0.005)  # waiting requests do not fit yet; let blocks free up

    def _waiting_keys(self) -> set[str]:
        return {s.request_id for s in self.engine.waiting}

    def _fail_step(self, exc: Exception) -> None:
        """Fail the requests a failed step concerned; every other request keeps going.

        An exception naming its sequences (a `request_ids` attribute) fails those alone. Otherwise the
        sequences the step took into its batch fail: those that were running, and those it admitted
        from the queue (no longer waiting). Requests waiting now hold no half-written state (never
        scheduled, or preempted and reset before the failure): they stay."""
        named = getattr(exc, "request_ids", None)
        if named is not None:
            concerned = set(named)
        else:
            still_waiting = self._waiting_keys()
            concerned = {k for k in self._tickets if k not in still_waiting}
        for key in concerned:
            ticket = self._tickets.pop(key, None)
            if ticket is None:
                continue
            self.engine.abort(key)
            self._unqueue(ticket)
            ticket.out.put(exc)
        self._cond.notify_all()
