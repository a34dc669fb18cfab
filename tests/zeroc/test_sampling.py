from __future__ import annotations

import pytest
import torch

from zeroc.sampling import SamplingParams, make_generator, sample_token


@pytest.mark.parametrize("kwargs, message", [
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"temperature": -1.0}, "temperature"),
    ({"top_k": -2}, "top_k"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"stop": ("",)}, "stop"),
    ({"temperature": 1e-45}, "temperature"),  # subnormal: logits / t overflow to inf
    ({"temperature": 9e-4}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": 100.5}, "temperature"),
    ({"top_p": float("nan")}, "top_p"),
    ({"seed": 2 ** 64}, "seed"),
    ({"stop": ("a",) * 17}, "stop"),
    ({"stop": ("a" * 257,)}, "stop"),
    ({"stop_token_ids": tuple(range(257))}, "stop_token_ids"),
])
def test_invalid_parameters_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_the_smallest_allowed_temperature_samples_finite_probabilities():
    logits = torch.tensor([80.0, -80.0, 79.0, 0.0])
    params = SamplingParams(temperature=1e-3, seed=3)
    assert {sample_token(logits, params, make_generator(params)) for _ in range(20)} == {0}


def _draws(logits, params, n=2000):
    gen = make_generator(params)
    return torch.tensor([sample_token(logits, params, gen) for _ in range(n)])


def test_greedy_takes_argmax():
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    assert sample_token(logits, SamplingParams(), None) == 1


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1]))
    k2 = _draws(logits, SamplingParams(temperature=1.0, top_k=2, seed=0))
    assert set(k2.tolist()) == {0, 1}
    p = _draws(logits, SamplingParams(temperature=1.0, top_p=0.65, seed=0))  # 0.4 + 0.3 reaches it
    assert set(p.tolist()) == {0, 1}
    full = _draws(logits, SamplingParams(temperature=1.0, seed=0))
    freq = torch.bincount(full, minlength=4).float() / len(full)
    assert torch.allclose(freq, torch.tensor([0.4, 0.3, 0.2, 0.1]), atol=0.04)


def test_low_temperature_concentrates_and_seed_repeats():
    logits = torch.tensor([1.0, 0.5, 0.0])
    cold = _draws(logits, SamplingParams(temperature=0.05, seed=1), n=200)
    assert (cold == 0).all()
    a = _draws(logits, SamplingParams(temperature=1.0, seed=7), n=50)
    b = _draws(logits, SamplingParams(temperature=1.0, seed=7), n=50)
    assert torch.equal(a, b)
