"""Arrival generators, checked statistically (fixed seeds; bounds of several standard errors)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from zeroc.bench.serve.load import LoadSpec, arrivals, gamma_arrivals, poisson_arrivals, read_trace
from zeroc.config import ZeroCError

N = 40_000


def _gaps(times: np.ndarray) -> np.ndarray:
    return np.diff(np.concatenate([[0.0], times]))


def test_poisson_gaps_have_the_rate_and_are_exponential():
    rate = 5.0
    gaps = _gaps(poisson_arrivals(rate, N, np.random.default_rng(1)))
    mean = 1 / rate
    assert abs(gaps.mean() - mean) < 5 * mean / np.sqrt(N)  # SE of the mean of an exponential = mean / sqrt(N)
    assert abs(gaps.std() / gaps.mean() - 1) < 0.05  # exponential: CV 1
    # Memorylessness in one number: half of the gaps fall below mean * ln 2 (the exponential's median).
    assert abs((gaps < mean * np.log(2)).mean() - 0.5) < 5 * 0.5 / np.sqrt(N)


@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_gamma_gaps_keep_the_rate_and_set_the_coefficient_of_variation(burstiness):
    rate = 2.0
    gaps = _gaps(gamma_arrivals(rate, burstiness, N, np.random.default_rng(2)))
    cv = 1 / np.sqrt(burstiness)
    assert abs(gaps.mean() - 1 / rate) < 5 * cv / rate / np.sqrt(N)
    assert abs(gaps.std() / gaps.mean() - cv) < 0.1 * cv


def test_poisson_counts_over_a_duration():
    """A duration-bound run: every arrival inside the window, Poisson count (variance = mean)."""
    spec = LoadSpec(kind="poisson", rate=10.0, duration_s=300.0, num_requests=1, seed=3)
    times, trace = arrivals(spec)
    assert trace is None and times.max() < 300.0 and np.all(np.diff(times) > 0)
    assert abs(times.size - 3000) < 5 * np.sqrt(3000)
    # Counts per 10 s window are Poisson(100): their variance matches their mean.
    counts = np.histogram(times, bins=30, range=(0, 300))[0]
    assert 0.5 < counts.var() / counts.mean() < 1.8


def test_count_bound_run_is_reproducible_per_seed():
    a, _ = arrivals(LoadSpec(kind="gamma", rate=1.0, burstiness=0.5, num_requests=50, seed=9))
    b, _ = arrivals(LoadSpec(kind="gamma", rate=1.0, burstiness=0.5, num_requests=50, seed=9))
    c, _ = arrivals(LoadSpec(kind="gamma", rate=1.0, burstiness=0.5, num_requests=50, seed=10))
    assert a.size == 50 and np.array_equal(a, b) and not np.array_equal(a, c)


def test_trace_is_sorted_shifted_and_capped(tmp_path):
    path = tmp_path / "trace.jsonl"
    rows = [{"timestamp": 105.5, "prompt_tokens": 30}, {"timestamp": 100.0, "output_tokens": 7},
            {"timestamp": 103.0}, {"timestamp": 190.0}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    entries = read_trace(path)
    assert [e.timestamp for e in entries] == [0.0, 3.0, 5.5, 90.0]
    assert (entries[0].output_tokens, entries[2].prompt_tokens) == (7, 30)
    times, kept = arrivals(LoadSpec(kind="trace", trace=str(path), num_requests=10, duration_s=60.0))
    assert times.tolist() == [0.0, 3.0, 5.5] and len(kept) == 3
    times, _ = arrivals(LoadSpec(kind="trace", trace=str(path), num_requests=2))
    assert times.tolist() == [0.0, 3.0]


@pytest.mark.parametrize("line", ['{"ts": 1}', "not json", '{"timestamp": "soon"}',
                                  '{"timestamp": 1, "prompt_tokens": 0}'])
def test_bad_trace_lines_name_the_file_and_line(tmp_path, line):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"timestamp": 0}\n' + line + "\n")
    with pytest.raises(ZeroCError, match=r"bad.jsonl:2"):
        read_trace(path)


@pytest.mark.parametrize("kwargs", [{"rate": 0}, {"rate": float("inf")}, {"burstiness": 0}, {"num_requests": 0},
                                    {"duration_s": -1}, {"kind": "uniform"}, {"kind": "trace"}])
def test_invalid_load_specs_are_refused(kwargs):
    with pytest.raises(ValueError):
        LoadSpec(**kwargs)
