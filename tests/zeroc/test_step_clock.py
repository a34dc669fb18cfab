"""zeroc.step_clock: the phases of an engine step, as `zeroc bench engine` reads them."""

from __future__ import annotations

import time

import pytest

from zeroc.config import CacheConfig, SchedulerConfig
from zeroc.engine import Engine
from zeroc.sampling import SamplingParams
from zeroc.step_clock import PHASES, NullClock, StepClock


def test_laps_add_the_time_since_the_previous_lap_to_their_phase():
    clock = StepClock()
    clock.start()
    time.sleep(0.02)
    clock.lap("schedule")
    time.sleep(0.01)
    clock.lap("wait")
    clock.lap("wait")  # no time since the last lap
    assert clock.steps == 1
    assert 0.02 <= clock.seconds["schedule"] < 0.2 and 0.01 <= clock.seconds["wait"] < 0.1
    assert clock.seconds["forward"] == 0.0
    assert clock.ms_per_step()["schedule"] == pytest.approx(clock.seconds["schedule"] * 1e3)
    with pytest.raises(KeyError):
        clock.lap("not-a-phase")


@pytest.mark.parametrize("ahead", [False, True], ids=["sync", "async"])
def test_an_engine_laps_every_phase_and_the_laps_add_up_to_its_steps(random_gqa, ahead):
    engine = Engine(random_gqa, CacheConfig(16, 128), SchedulerConfig(async_scheduling=ahead))
    assert isinstance(engine.clock, NullClock) and not isinstance(engine.clock, StepClock)
    for prompt in ("The built-in function", "import os\n"):
        engine.add_request(prompt, SamplingParams(max_new_tokens=6, ignore_eos=True))
    engine.clock = clock = StepClock()
    wall = 0.0
    while engine.has_unfinished():
        t = time.perf_counter()
        engine.step()
        wall += time.perf_counter() - t
    assert clock.steps >= 6
    assert all(clock.seconds[p] > 0 for p in PHASES), clock.seconds
    # laps start when a step starts and end before it returns: they cover its wall time, less the return
    assert 0.9 * wall <= sum(clock.seconds.values()) <= wall
