"""The engine loop: one thread owns the Engine; request handler threads talk to it through an inbox.

Handlers never wait behind an engine step: `admit`, `submit` and `release` only touch a small counter
lock and put a command in the inbox, which the loop thread drains between steps (FIFO, so a handler's
commands run in the order it sent them). Calls that need the cache's answer (`reserve`, `run_locked`)
wait for their command to run between two steps, never for a lock the step holds.

Admission: a request holds a queue place from acceptance until its first token (or its end);
past `max_queue` places new requests are refused. Disaggregated requests also reserve cache
slots for their prompt before fetching its KV; they wait here while the cache is full.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from zeroc.config import ThreadsConfig
from zeroc.cpu_threads import ThreadGovernor, enter_engine_thread
from zeroc.engine import Engine, StepOutput
from zeroc.sampling import SamplingParams

log = logging.getLogger(__name__)
_IDLE_POLL_S = 0.1  # how often a loop with reservations waiting for space rechecks their callers
_NO_FIT_WAIT_S = 0.005  # waiting requests do not fit yet: wait this long (or for a command) for blocks


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
    released: bool = False  # `release` was called: a submit still in the inbox adds nothing
    filling: bool = False  # its handler writes into its reserved slots (`EngineLoop.filling`)
    priority: int = 0  # lower runs first under the "priority" scheduling policy, here and in the engine


@dataclass(frozen=True)
class LoopStats:
    blocks_total: int
    blocks_free: int
    block_size: int
    running: int
    queued: int
    token_capacity: int = 0  # tokens the whole cache holds (its blocks times their tokens)


@dataclass
class _Reservation:
    """A `reserve` call waiting, in the loop thread, for the cache to have room."""

    ticket: Ticket
    num_tokens: int
    is_active: Callable[[], bool]
    started: float
    done: Future


class EngineLoop:
    def __init__(self, engine: Engine, max_queue: int, threads: ThreadsConfig | None = None):
        """`threads`: the engine thread's intra-op threads and cores (None: leave PyTorch's as they are)."""
        self.engine = engine
        self.threads = threads
        self.max_queue = max_queue
        self._inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._count_lock = threading.Lock()  # guards `_queued` and tickets' `queued` flags; never held long
        self._step_lock = threading.Lock()  # held by the loop thread while it drains and steps; see `paused`
        self._tickets: dict[str, Ticket] = {}  # loop thread only
        self._reservations: list[_Reservation] = []  # loop thread only, by priority, then FIFO
        self._queued = 0
        self._stopping = False
        self._cache_stats = (engine.cache.num_blocks, engine.cache.num_free_blocks, 0)  # published by the loop
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    # -- called by request handler threads -----------------------------------------------------
    def admit(self, priority: int = 0) -> Ticket:
        """A queue place for a new request (`priority`: checked by the caller, Engine.check_priority)."""
        with self._count_lock:
            if self._stopping:
                raise ShuttingDownError("the service is shutting down")
            if self._queued >= self.max_queue:
                raise QueueFullError(f"{self._queued} requests are already queued (limit {self.max_queue}); "
                                     "retry later or use another replica")
            self._queued += 1
            return Ticket(key=uuid.uuid4().hex, priority=priority)

    def reserve(self, ticket: Ticket, num_tokens: int, is_active: Callable[[], bool]) -> torch.Tensor:
        """Wait until the cache can hold `num_tokens` prompt tokens, then take their slots: [num_tokens]."""
        done: Future = Future()
        self._send(lambda: self._queue_reservation(
            _Reservation(ticket, num_tokens, is_active, time.monotonic(), done)))
        return done.result()

    @contextlib.contextmanager
    def filling(self, ticket: Ticket) -> Iterator[None]:
        """Held by a handler while it writes into the ticket's reserved slots (a KV transfer, the KV store's
        prefix): a `release` meanwhile (the caller went away, on gRPC's callback thread) frees the slots only once
        this ends, so no other request is handed blocks that are still being written."""
        with self._count_lock:
            ticket.filling = True
        try:
            yield
        finally:
            with self._count_lock:
                ticket.filling = False
                forget = ticket.released
            if forget:
                self._inbox.put(lambda: self._forget(ticket))

    def unreserve(self, ticket: Ticket) -> None:
        """Give back the slots `reserve` took (the request itself stays admitted)."""
        self._inbox.put(lambda: self.engine.abort(ticket.key))

    def run_locked(self, fn: Callable[[], None]) -> None:
        """Run `fn` in the loop thread between engine steps (e.g. encoding received KV into the cache);
        returns once it ran, raising what it raised."""
        done: Future = Future()

        def command() -> None:
            try:
                done.set_result(fn())
            except Exception as exc:  # handed to the caller, whose request it concerns
                done.set_exception(exc)
        self._send(command)
        done.result()

    def submit(self, ticket: Ticket, ids: list[int], params: SamplingParams, cached_tokens: int) -> None:
        """Hand a request to the engine; returns at once (the loop adds it before its next step)."""
        self._send(lambda: self._add(ticket, ids, params, cached_tokens))

    def release(self, ticket: Ticket) -> None:
        """Forget a request in any state; its blocks are freed before the next step (or, while its handler is
        `filling` them, once it stops). Idempotent."""
        with self._count_lock:
            ticket.released = True
            deferred = ticket.filling
        self._unqueue(ticket)
        if not deferred:
            self._inbox.put(lambda: self._forget(ticket))

    def stats(self) -> LoopStats:
        total, free, running = self._cache_stats
        with self._count_lock:
            queued = self._queued
        cache = self.engine.cache
        return LoopStats(total, free, cache.block_size, running, queued, cache.total_tokens)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """No command runs and no step starts while this is held: commands sent meanwhile all run together
        before the next step (tests use it to put several requests in one batch)."""
        with self._step_lock:
            yield

    def load(self) -> tuple[int, int]:
        """(running, queued) read without the lock, for metrics: the loop thread re-takes the lock right after
        each step, so a reader that waits for it may wait until the load is gone."""
        return len(self.engine.running), self._queued

    def stop(self) -> None:
        """Stop stepping; requests still in flight end with finish reason "abort"."""
        with self._count_lock:
            self._stopping = True
        self._inbox.put(lambda: None)  # wake the loop
        self._thread.join(timeout=30)
        self._drain()  # commands sent before the flag was seen: their tickets end below
        for r in self._reservations:
            r.done.set_exception(ShuttingDownError("the service is shutting down"))
        self._reservations.clear()
        for ticket in list(self._tickets.values()):
            self.engine.abort(ticket.key)
            ticket.out.put(StepOutput(ticket.key, [], "", True, "abort"))
        self._tickets.clear()

    def _send(self, command: Callable[[], None]) -> None:
        """Queue a command whose caller waits for it, or raise ShuttingDownError: checked and queued under the
        lock `stop` sets its flag under, so every command either reaches stop's last drain or is refused."""
        with self._count_lock:
            if self._stopping:
                raise ShuttingDownError("the service is shutting down")
            self._inbox.put(command)

    def _unqueue(self, ticket: Ticket) -> None:
        with self._count_lock:
            if ticket.queued:
                ticket.queued = False
                self._queued -= 1

    # -- the loop thread -------------------------------------------------------------------------
    def _add(self, ticket: Ticket, ids: list[int], params: SamplingParams, cached_tokens: int) -> None:
        if ticket.released:  # the caller went away before its request reached the engine
            self.engine.abort(ticket.key)
            return
        try:
            self.engine.add_request(ids, params, ticket.key, cached_tokens=cached_tokens, priority=ticket.priority)
        except Exception as exc:  # a request the engine refuses fails alone
            self.engine.abort(ticket.key)
            self._unqueue(ticket)
            ticket.out.put(exc)
            return
        self._tickets[ticket.key] = ticket

    def _forget(self, ticket: Ticket) -> None:
        self.engine.abort(ticket.key)
        self._tickets.pop(ticket.key, None)

    def _drain(self) -> None:
        """Run every command sent so far, then grant the reservations that fit now (in their order)."""
        while True:
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                break
            command()
        self._grant_reservations()

    def _queue_reservation(self, r: _Reservation) -> None:
        """Queue `r` behind every reservation of its priority or a lower value (all are 0 under fcfs: FIFO)."""
        at = next((i for i, q in enumerate(self._reservations) if q.ticket.priority > r.ticket.priority),
                  len(self._reservations))
        self._reservations.insert(at, r)

    def _grant_reservations(self) -> None:
        """Answer every reservation whose caller left (wherever it waits in line), then grant those that fit now,
        in order. None is granted once the loop is stopping (`stop` refuses them)."""
        for r in [r for r in self._reservations if not r.is_active()]:
            self._reservations.remove(r)
            r.done.set_exception(CancelledError("cancelled while waiting for KV cache space"))
        cache = self.engine.cache
        while self._reservations and not self._stopping:
            r = self._reservations[0]
            # Leave a block of growth per running sequence so receiving KV does not force preemption, and what the
            # waiting sequences that hold blocks still need (else two received prefixes could each wait for the other).
            need = cache.blocks_needed(r.ticket.key, r.num_tokens + 1)
            if cache.num_free_blocks - len(self.engine.running) - self.engine.blocks_owed() < need:
                return  # in order: later reservations wait behind this one
            self._reservations.pop(0)
            r.ticket.reserve_wait_s = time.monotonic() - r.started
            try:
                r.done.set_result(self.engine.reserve(r.ticket.key, r.num_tokens))
            except Exception as exc:
                r.done.set_exception(exc)

    def _wait_for_work(self) -> None:
        """Block until a command arrives while there is nothing to step."""
        while not self._stopping and not self.engine.has_unfinished():
            try:
                command = self._inbox.get(timeout=_IDLE_POLL_S if self._reservations else None)
            except queue.Empty:
                command = None
            with self._step_lock:
                if command is not None:
                    command()
                self._drain()

    def _run(self) -> None:
        governor = None
        if self.threads is not None:
            threads, _ = enter_engine_thread(self.threads)
            on_cpu = torch.device(self.engine.device).type == "cpu"  # on a GPU the host threads barely matter
            governor = ThreadGovernor(threads) if self.threads.adaptive and on_cpu else None
        while True:
            self._wait_for_work()
            if self._stopping:
                return
            with self._step_lock:
                self._drain()
                outs = self._governed_step(governor) if governor else self._step()
                c = self.engine.cache
                self._cache_stats = (c.num_blocks, c.num_free_blocks, len(self.engine.running))
            if not outs and self.engine.has_unfinished():
                with contextlib.suppress(queue.Empty):  # nothing fit: wait for blocks, or a command
                    command = self._inbox.get(timeout=_NO_FIT_WAIT_S)
                    with self._step_lock:
                        command()

    def _governed_step(self, governor: ThreadGovernor) -> list[StepOutput]:
        """A step on the thread count the governor picks."""
        governor.choose()
        started = time.perf_counter()
        outs = self._step()
        if self.engine.last_step_tokens:
            governor.record(self.engine.last_step_tokens, time.perf_counter() - started)
        return outs

    def _step(self) -> list[StepOutput]:
        try:
            outs = self.engine.step()
        except Exception as exc:  # keep serving: fail the requests this step concerned, free their blocks
            log.exception("engine step failed")
            self._fail_step(exc)
            return []
        for out in outs:
            ticket = self._tickets.get(out.request_id)
            if ticket is None:
                continue
            self._unqueue(ticket)
            ticket.out.put(out)
            if out.finished:
                del self._tickets[out.request_id]
        return outs

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
