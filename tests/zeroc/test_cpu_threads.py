"""The engine thread's CPU threads: how many, and which cores it keeps to."""

from __future__ import annotations

import threading

import pytest
import torch

from zeroc.config import ThreadsConfig, ZeroCConfig
from zeroc.cpu_threads import ThreadGovernor, engine_cores, engine_thread_count, enter_engine_thread


@pytest.mark.parametrize("cores, pin, kept", [([0, 1], True, [0, 1]), ([0], True, [0]),
                                              ([0, 1, 2, 3], True, [1, 2, 3]), ([0, 1, 2, 3], False, [0, 1, 2, 3])])
def test_a_core_is_kept_for_the_service_threads_only_past_two(cores, pin, kept):
    assert engine_cores(ThreadsConfig(pin=pin), cores) == kept


def test_thread_count_setting_then_omp_then_cores():
    cores = list(range(8))
    assert engine_thread_count(ThreadsConfig(engine=3), cores, {"OMP_NUM_THREADS": "1"}) == 3
    assert engine_thread_count(ThreadsConfig(), cores, {"OMP_NUM_THREADS": "2"}) == 2
    assert engine_thread_count(ThreadsConfig(), cores, {}) == 7
    assert engine_thread_count(ThreadsConfig(), [0, 1], {}) == 2


def test_the_setting_has_an_environment_equivalent_and_is_checked():
    cfg = ZeroCConfig.from_env(env={"ZEROC_THREADS_ENGINE": "1", "ZEROC_THREADS_PIN": "0",
                                    "ZEROC_THREADS_SPIN_COUNT": "500"})
    assert cfg.threads == ThreadsConfig(engine=1, pin=False, spin_count=500)
    with pytest.raises(ValueError, match="threads.engine"):
        ThreadsConfig(engine=-1)
    with pytest.raises(ValueError, match="threads.spin_count"):
        ThreadsConfig(spin_count=-1)


def test_a_service_sets_the_spin_count_before_torch_loads_libgomp():
    # libgomp reads GOMP_SPINCOUNT once, when torch loads it: `zeroc serve` sets it after reading its config,
    # which must not have imported torch by then.
    import subprocess
    import sys

    code = ("import sys; from zeroc import cli; from zeroc.cli import common, serve; "
            "serve.cmd_serve = lambda args: print('torch' in sys.modules, common.service_config(args).threads); "
            "cli.main(['serve', 'decode', '--colocated'])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == f"False {ThreadsConfig()}"


def test_entering_sets_the_calling_threads_pool():
    seen = []

    def engine_thread():
        enter_engine_thread(ThreadsConfig(engine=1))
        seen.append(torch.get_num_threads())
    t = threading.Thread(target=engine_thread)
    t.start()
    t.join()
    assert seen == [1]


_ONLY_THE_ENGINE_RUNS_PARALLEL = """
import threading, torch
from zeroc.config import BUNDLED_MODEL, ThreadsConfig
from zeroc.cpu_threads import enter_engine_thread, serial_by_default
from zeroc.engine import Engine, SamplingParams
from zeroc.config import CacheConfig, SchedulerConfig
from zeroc.loader import load_model

serial_by_default()
loaded = load_model(BUNDLED_MODEL, attention_backend="{backend}")
seen = {{}}

def engine_thread():
    enter_engine_thread(ThreadsConfig(engine=2))
    engine = Engine(loaded, CacheConfig(16, num_blocks=64), SchedulerConfig(enforce_eager=True))
    engine.generate([list(range(4, 60))], SamplingParams(max_new_tokens=3, ignore_eos=True))
    seen["engine"] = torch.get_num_threads()

def other_thread():
    torch.ones(1 << 20).sum()  # its first parallel op sets up its pool from the default
    seen["other"] = torch.get_num_threads()

for target in (engine_thread, other_thread):
    t = threading.Thread(target=target)
    t.start()
    t.join()
seen["main"] = torch.get_num_threads()
print(seen)
"""


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_only_the_engine_thread_runs_parallel_work(backend):
    # In a child: the setting is process-wide. "auto" runs the ragged C++ kernel where it builds, whose first
    # parallel call on a thread used to reset that thread's pool to the process default (one).
    import subprocess
    import sys

    code = _ONLY_THE_ENGINE_RUNS_PARALLEL.format(backend=backend)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "{'engine': 2, 'other': 1, 'main': 1}"


class _Machine:
    """A clock and step times per thread count: what the governor sees of a machine."""

    def __init__(self, step_s: dict[int, float]):
        self.now, self.step_s, self.switches = 0.0, step_s, []

    def run(self, governor: ThreadGovernor, steps: int, tokens: int = 1) -> list[int]:
        used = []
        for _ in range(steps):
            n = governor.choose()
            self.now += self.step_s[n]
            governor.record(tokens, self.step_s[n])
            used.append(n)
        return used


def _governor(machine: _Machine) -> ThreadGovernor:
    return ThreadGovernor(2, probe_s=1.0, clock=lambda: machine.now, set_threads=machine.switches.append)


def test_governor_keeps_the_whole_pool_on_a_quiet_machine():
    m = _Machine({2: 0.0026, 1: 0.0038})
    used = m.run(_governor(m), 2000)  # about 5 s
    assert used[:100] == [2] * 100  # nothing to re-check in the first second
    assert 0 < used.count(1) <= 5 * 4  # each second, a probe of one thread (plus its uncounted first step)
    assert used[-50:] == [2] * 50


def test_governor_drops_to_one_thread_under_a_competing_load_and_comes_back():
    m = _Machine({2: 0.015, 1: 0.0036})  # beside a busy process, two threads wait for a preempted worker
    g = _governor(m)
    used = m.run(g, 1000)
    assert used[-500:].count(1) > 480 and g.mode == 1
    m.step_s = {2: 0.0026, 1: 0.0038}  # the load went away
    used = m.run(g, 1000)
    assert used[-500:].count(2) > 480 and g.mode == 2
    assert m.switches[0] == 1 and set(m.switches) == {1, 2}


def test_governor_compares_steps_of_the_same_size_only():
    # Probes on one thread that happen to be small steps must not beat large steps on two.
    m = _Machine({2: 0.010, 1: 0.004})
    g = _governor(m)
    for _ in range(400):
        n = g.choose()
        tokens = 1 if n == 1 else 256  # one thread only ever sees tiny steps
        m.now += 0.01
        g.record(tokens, 0.004 if n == 1 else 0.010)
    assert g.mode == 2


def test_governor_does_nothing_with_one_thread():
    m = _Machine({1: 0.004})
    assert set(m.run(ThreadGovernor(1, clock=lambda: m.now, set_threads=m.switches.append), 1000)) == {1}
    assert m.switches == []
