"""The prefill worker's queue (prefill_service/worker.py, JobQueue): prompts by priority, then arrival; a job put
back keeps its place; the stop marker comes after every job; cancelled jobs take no place in a batch."""

from __future__ import annotations

import queue

import pytest

from prefill_service.worker import JobQueue, PrefillJob


def test_jobs_come_by_priority_then_arrival_and_a_job_put_back_keeps_its_place():
    jobs = [PrefillJob(f"j{i}", [1, 2], 1024, priority=p) for i, p in enumerate([2, 0, 2, -1, 0])]
    q = JobQueue()
    q.put(jobs[0])
    q.put(None)  # stop, queued before the rest: still taken last
    for job in jobs[1:]:
        q.put(job)
    first = q.get()
    second = q.get()
    q.put(second)  # over the batch's budget: back in line, ahead of later equals
    assert q.qsize() == 5
    order = [first.request_id] + [q.get().request_id for _ in range(4)]
    assert order == ["j3", "j1", "j4", "j0", "j2"] and q.get() is None
    with pytest.raises(queue.Empty):
        q.get_nowait()


def test_jobs_whose_callers_left_take_no_place_in_a_batch(bundled):
    from prefill_service.worker import PrefillWorker
    from zeroc.config import CacheConfig, SchedulerConfig

    worker = PrefillWorker(bundled, CacheConfig(block_size=16, num_blocks=64), SchedulerConfig(max_num_seqs=2))
    worker.stop()  # its thread gone: batches are taken here
    jobs = [PrefillJob(f"j{i}", [1, 2, 3], 1024) for i in range(5)]
    for i in (0, 2, 3):
        jobs[i].cancelled.set()
    for job in jobs:
        worker._pending.put(job)
    worker._pending.put(None)
    assert [j.request_id for j in worker._take_batch()] == ["j1", "j4"]  # two places, both for live jobs
    assert worker._take_batch() is None
