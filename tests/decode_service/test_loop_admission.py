"""Handlers never wait behind an engine step: the engine loop, in process, over a real engine whose step is
held open (it waits on an event before stepping) while handler calls come in."""

from __future__ import annotations

import threading

import zeroc.engine
from decode_service.loop import EngineLoop
from zeroc.config import CacheConfig, SchedulerConfig
from zeroc.engine import Engine, StepOutput
from zeroc.sampling import SamplingParams

PARAMS = SamplingParams(max_new_tokens=5, ignore_eos=True)
HANDLER_WAIT_S = 10.0  # far longer than a queue put; a handler that waits for the step never returns in it


class GatedEngine(Engine):
    """An engine whose steps, once `hold` is set, wait for `gate` before stepping."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.hold = threading.Event()
        self.in_step = threading.Event()
        self.gate = threading.Event()

    def step(self) -> list[StepOutput]:
        if self.hold.is_set():
            self.in_step.set()
            self.gate.wait()
        return super().step()


def drain(ticket, timeout: float = 120.0) -> list[int]:
    tokens: list[int] = []
    while True:
        out = ticket.out.get(timeout=timeout)
        assert not isinstance(out, Exception), out
        tokens += out.token_ids
        if out.finished:
            return tokens


def _granted_within(got: list, seconds: float, n: int = 1) -> bool:
    """Whether `got` holds `n` items within `seconds` (another thread appends them)."""
    for _ in range(int(seconds / 0.01)):
        if len(got) >= n:
            return True
        threading.Event().wait(0.01)
    return len(got) >= n


def in_thread(fn) -> tuple[threading.Thread, list]:
    got: list = []
    t = threading.Thread(target=lambda: got.append(fn()), daemon=True)
    t.start()
    return t, got


def test_admit_submit_release_and_stats_return_while_a_step_runs(bundled):
    want = [r.token_ids for r in Engine(bundled, CacheConfig()).generate([[5, 6, 7, 8], [9, 10, 11]], PARAMS)]
    engine = GatedEngine(bundled, CacheConfig())
    loop = EngineLoop(engine, max_queue=8)
    try:
        first = loop.admit()
        engine.hold.set()
        loop.submit(first, [5, 6, 7, 8], PARAMS, 0)
        assert engine.in_step.wait(60), "the loop never stepped the first request"

        def handler():  # what a Generate handler does before streaming, plus a cancelled request
            ticket = loop.admit()
            loop.submit(ticket, [9, 10, 11], PARAMS, 0)
            gone = loop.admit()
            loop.release(gone)
            return ticket, loop.stats()

        t, got = in_thread(handler)
        t.join(HANDLER_WAIT_S)
        assert not t.is_alive(), "a handler waited for the engine step to end"
        assert not engine.gate.is_set()  # the step was still in progress all along
        second, stats = got[0]
        assert stats.queued == 2  # both unserved requests hold a queue place; the released one does not
        engine.hold.clear()
        engine.gate.set()
        assert drain(first) == want[0]
        assert drain(second) == want[1]
        assert loop.stats().queued == 0
        assert engine.cache.num_free_blocks == engine.cache.num_blocks
    finally:
        engine.gate.set()
        loop.stop()


def test_requests_sent_during_a_step_join_the_next_one(bundled, monkeypatch):
    engine = GatedEngine(bundled, CacheConfig())
    loop = EngineLoop(engine, max_queue=8)
    try:
        first = loop.admit()
        engine.hold.set()
        loop.submit(first, [5, 6, 7, 8], SamplingParams(max_new_tokens=20, ignore_eos=True), 0)
        assert engine.in_step.wait(60)
        others = [loop.admit() for _ in range(3)]
        for i, ticket in enumerate(others):
            loop.submit(ticket, [9 + i, 10, 11], PARAMS, 0)
        seen: list[int] = []
        original = zeroc.engine.admit

        def record(*args):  # what the next step takes from the queue
            admitted = original(*args)
            seen.append(len(admitted))
            return admitted
        monkeypatch.setattr(zeroc.engine, "admit", record)
        engine.hold.clear()
        engine.gate.set()
        for ticket in [first, *others]:
            drain(ticket)
        assert seen[1] == 3  # step 0 took the first request; the next one took all three at once
    finally:
        engine.gate.set()
        loop.stop()


def test_reservations_waiting_for_cache_space_are_granted_by_priority(bundled):
    """Each reservation needs 5 of the 8 blocks, so one at a time is granted: by priority, then arrival."""
    engine = Engine(bundled, CacheConfig(block_size=16, num_blocks=8), SchedulerConfig(policy="priority"))
    loop = EngineLoop(engine, max_queue=8)
    granted: list[int] = []
    try:
        holder = loop.admit()
        loop.reserve(holder, 64, lambda: True)
        tickets = {}
        for priority in (2, 0, 1, 0):  # arrival order
            ticket = tickets[len(tickets)] = loop.admit(priority)
            in_thread(lambda t=ticket: (loop.reserve(t, 64, lambda: True), granted.append(t)))
            while len(loop._reservations) < len(tickets):  # queued before the next arrives
                threading.Event().wait(0.01)
        loop.unreserve(holder)
        for n in range(1, 5):  # each granted one gives its blocks back for the next
            assert _granted_within(granted, 10, n)
            loop.unreserve(granted[n - 1])
        assert [t.priority for t in granted] == [0, 0, 1, 2]
        assert granted[:2] == [tickets[1], tickets[3]]  # equal priorities in arrival order
    finally:
        loop.stop()


def test_a_reservation_leaves_the_blocks_a_waiting_received_prefix_still_needs(bundled):
    """One sequence slot: a long request runs while a received prefix (4 blocks, 4 more to come) waits for the
    slot. A second transfer's 7 blocks would fit the free ones, but not beside what the waiting prefix still needs:
    it is granted only once that prefix has run (before the fix it took them at once, and one of the two waiting
    prefixes had to give its blocks back and be computed again)."""
    engine = Engine(bundled, CacheConfig(block_size=16, num_blocks=16), SchedulerConfig(max_num_seqs=1))
    loop = EngineLoop(engine, max_queue=8)
    prompt = bundled.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 40)
    try:
        long = loop.admit()
        loop.submit(long, prompt[:20], SamplingParams(max_new_tokens=60, ignore_eos=True), 0)
        waiting = loop.admit()
        loop.reserve(waiting, 64, lambda: True)  # as a KV transfer fills them
        loop.submit(waiting, prompt[:128], PARAMS, 64)
        second = loop.admit()
        _, granted = in_thread(lambda: loop.reserve(second, 96, lambda: True))
        while not (loop._reservations or granted):  # the request reached the loop
            threading.Event().wait(0.01)
        seen = 0
        while seen < 10:  # ten more steps of the long request: it still runs, so the prefix still waits
            out = long.out.get(timeout=120)
            seen += len(out.token_ids)
        assert not granted and not out.finished
        drain(long)
        drain(waiting)
        assert _granted_within(granted, 10) and engine.num_preemptions == 0
        loop.unreserve(second)
    finally:
        loop.stop()


def test_slots_being_filled_are_freed_only_once_their_handler_stops_writing(bundled):
    """The caller goes away (gRPC's callback releases its ticket) while its handler still writes KV into its slots:
    another request must not be handed those blocks until the handler is done."""
    engine = Engine(bundled, CacheConfig(block_size=16, num_blocks=8))
    loop = EngineLoop(engine, max_queue=8)
    try:
        first, second = loop.admit(), loop.admit()
        with loop.filling(first):
            mine = loop.reserve(first, 120, lambda: True)  # all 8 blocks
            loop.release(first)  # the callback, from another thread
            _, got = in_thread(lambda: loop.reserve(second, 120, lambda: True))
            assert not _granted_within(got, 0.5)  # the loop polls reservations every 0.1 s
        assert _granted_within(got, 30) and set((got[0] // 16).tolist()) == set((mine // 16).tolist())  # now free
        loop.unreserve(second)
    finally:
        loop.stop()


def test_a_caller_that_leaves_a_reservation_behind_another_is_answered_at_once(bundled):
    engine = Engine(bundled, CacheConfig(block_size=16, num_blocks=8))
    loop = EngineLoop(engine, max_queue=8)
    errors: list[Exception] = []
    left = threading.Event()
    try:
        holder, head, behind = loop.admit(), loop.admit(), loop.admit()
        loop.reserve(holder, 64, lambda: True)
        _, head_got = in_thread(lambda: loop.reserve(head, 64, lambda: True))  # waits: 5 of the 3 free blocks
        while not loop._reservations:
            threading.Event().wait(0.01)

        def leave() -> None:
            try:
                loop.reserve(behind, 16, lambda: not left.is_set())
            except Exception as exc:  # noqa: BLE001 (what the caller was answered)
                errors.append(exc)
        in_thread(leave)
        while len(loop._reservations) < 2:
            threading.Event().wait(0.01)
        left.set()
        assert _granted_within(errors, 10) and type(errors[0]).__name__ == "CancelledError"
        assert len(loop._reservations) == 1 and not head_got  # the head still waits for its blocks
        loop.unreserve(holder)
        assert _granted_within(head_got, 10)  # and gets them once they are free
        loop.unreserve(head)
    finally:
        loop.stop()
