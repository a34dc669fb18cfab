"""A failure in one engine step ends only the requests it concerns: the engine loop, in process, over a
real engine whose `step` raises once (fault injection) while other requests run or wait."""

from __future__ import annotations

import queue

import pytest

from decode_service.loop import EngineLoop
from zeroc.config import CacheConfig, SchedulerConfig
from zeroc.engine import Engine, StepOutput
from zeroc.sampling import SamplingParams

PARAMS = SamplingParams(max_new_tokens=6, ignore_eos=True)


class SequenceFault(RuntimeError):
    def __init__(self, request_ids: list[str]):
        super().__init__("a sequence's logits were not finite")
        self.request_ids = request_ids


class FaultyEngine(Engine):
    """An engine whose next step raises `fault` once `trigger()` holds (then steps normally)."""

    fault: Exception | None = None
    trigger = staticmethod(lambda engine: False)

    def step(self) -> list[StepOutput]:
        if self.fault is not None and self.trigger(self):
            fault, self.fault = self.fault, None
            raise fault
        return super().step()


def drain(ticket, timeout: float = 120.0) -> tuple[list[int], Exception | None]:
    tokens: list[int] = []
    while True:
        out = ticket.out.get(timeout=timeout)
        if isinstance(out, Exception):
            return tokens, out
        tokens += out.token_ids
        if out.finished:
            return tokens, None


def start(loop: EngineLoop, prompt: list[int]):
    ticket = loop.admit()
    loop.submit(ticket, prompt, PARAMS, 0)
    return ticket


@pytest.fixture
def reference(bundled):
    want = Engine(bundled, CacheConfig()).generate([[5, 6, 7, 8], [9, 10, 11]], PARAMS)
    return [r.token_ids for r in want]


def test_a_fault_naming_its_sequence_fails_that_request_alone(bundled, reference):
    engine = FaultyEngine(bundled, CacheConfig())
    loop = EngineLoop(engine, max_queue=8)
    try:
        with loop.paused():  # both queued before the loop steps, so they share every batch
            a, b = start(loop, [5, 6, 7, 8]), start(loop, [9, 10, 11])
            engine.trigger = lambda e: len(e.running) == 2 and all(len(s.output_ids) >= 2 for s in e.running)
            engine.fault = SequenceFault([b.key])
        got_a, err_a = drain(a)
        got_b, err_b = drain(b)
        assert err_a is None and got_a == reference[0]
        assert isinstance(err_b, SequenceFault) and len(got_b) == 2
        assert engine.cache.num_free_blocks == engine.cache.num_blocks
    finally:
        loop.stop()


def test_an_anonymous_fault_fails_the_batch_but_not_the_requests_still_waiting(bundled, reference):
    engine = FaultyEngine(bundled, CacheConfig(), SchedulerConfig(max_num_seqs=1))
    loop = EngineLoop(engine, max_queue=8)
    try:
        with loop.paused():  # one sequence per batch: the second waits while the first runs
            a, b = start(loop, [5, 6, 7, 8]), start(loop, [9, 10, 11])
            engine.trigger = lambda e: bool(e.running) and len(e.running[0].output_ids) >= 3
            engine.fault = RuntimeError("the step failed")
        got_a, err_a = drain(a)
        got_b, err_b = drain(b)
        assert isinstance(err_a, RuntimeError) and len(got_a) == 3
        assert err_b is None and got_b == reference[1]
        with pytest.raises(queue.Empty):
            a.out.get_nowait()
        assert engine.cache.num_free_blocks == engine.cache.num_blocks
    finally:
        loop.stop()
