"""The batched sampler against a per-row reference (multinomial over the cut distribution), both ways it runs:
the torch path (a GPU's, and the torch and triton backends') and the CPU kernel (the cpu backend's)."""

from __future__ import annotations

import functools

import pytest
import torch

from zeroc.sampling import (CPU_CANDIDATES, FAILED, SamplingBatch, SamplingParams, _cut_support, _inverse_cdf,
                            _thresholds, make_generator, sample_batch)

CPU = torch.device("cpu")


@pytest.fixture(scope="module", params=["torch", "cpu-kernel"])
def sample(request):
    """sample_batch by the torch path, or by the CPU kernel module (kernels/csrc/sampling.cpp)."""
    if request.param == "torch":
        return sample_batch
    kernel = request.getfixturevalue("cpu_kernel")
    return functools.partial(sample_batch, native=kernel)


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
    ({"min_p": -0.1}, "min_p"),
    ({"min_p": 1.5}, "min_p"),
    ({"min_p": float("nan")}, "min_p"),
    ({"seed": 2 ** 64}, "seed"),
    ({"stop": ("a",) * 17}, "stop"),
    ({"stop": ("a" * 257,)}, "stop"),
    ({"stop_token_ids": tuple(range(257))}, "stop_token_ids"),
    ({"logprobs": -1}, "logprobs"),
    ({"logprobs": 21}, "logprobs"),
    ({"logprobs": 2.5}, "logprobs"),
    ({"frequency_penalty": 2.5}, "frequency_penalty"),
    ({"presence_penalty": float("nan")}, "presence_penalty"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": float("inf")}, "repetition_penalty"),
    ({"logit_bias": ((5, 101.0),)}, "logit_bias"),
    ({"logit_bias": ((-1, 1.0),)}, "logit_bias"),
    ({"logit_bias": ((5, 1.0), (5, 2.0))}, "logit_bias"),
    ({"logit_bias": tuple((i, 1.0) for i in range(301))}, "logit_bias"),
    ({"logit_bias": ((5, float("nan")),)}, "logit_bias"),
])
def test_invalid_parameters_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def reference_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The distribution one row samples from, computed on its own: logits [V] -> probs [V]. vLLM's order: min-p
    first (on the probabilities at the row's temperature), then top-k, then top-p over what is left."""
    scores = logits.double() / p.temperature
    if p.min_p > 0.0:
        probs = torch.softmax(scores, dim=-1)
        scores = scores.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
    if p.top_k and p.top_k < scores.numel():
        kth = torch.topk(scores, p.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        drop = (probs.cumsum(-1) - probs) >= p.top_p
        scores = scores.scatter(0, order, sorted_scores.masked_fill(drop, float("-inf")))
    return torch.softmax(scores, dim=-1)


def test_the_smallest_allowed_temperature_samples_finite_probabilities(sample):
    logits = torch.tensor([[80.0, -80.0, 79.0, 0.0]])
    params = SamplingParams(temperature=1e-3, seed=3)
    gen = make_generator(params)
    ids = [sample(logits, SamplingBatch.build([params], [gen], 4, logits.device), None).tolist()
           for _ in range(20)]
    assert ids == [[0]] * 20  # finite, never FAILED, and the top logit at this temperature


def test_extreme_finite_logits_sample_without_failing(sample):
    """The shift by the row's max comes before the temperature: logits at fp32's ends stay finite weights."""
    logits = torch.tensor([[3e38, -3e38, 2.9e38, 0.0], [-3e38, -3e38, -3e38, -2.9e38]])
    params = [SamplingParams(temperature=1e-3, seed=1), SamplingParams(temperature=100.0, top_p=0.5, seed=2)]
    ids = sample(logits, _batch(params, vocab=4)).tolist()
    assert ids == [0, 3]


def _batch(params, gens=None, vocab=8):
    gens = gens if gens is not None else [make_generator(p) for p in params]
    return SamplingBatch.build(params, gens, vocab, CPU)


def test_greedy_takes_the_argmax_of_every_row(sample):
    logits = torch.randn(5, 11, generator=torch.Generator().manual_seed(0))
    ids = sample(logits, _batch([SamplingParams()] * 5, vocab=11))
    assert torch.equal(ids, logits.argmax(-1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits_give_the_fp32_argmax_ties_included(sample, dtype):
    """Greedy rows take the argmax in the logits' own dtype (no fp32 copy of [B, V]): the same ids as in fp32,
    the first of tied maxima too, and a row with an inf still fails."""
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(1)).to(dtype)
    logits[2, [7, 30]] = 9.0  # a tie: the first index wins
    logits[4, 3] = float("inf")
    params = [SamplingParams()] * 5 + [SamplingParams(temperature=0.8, seed=2)]
    ids = sample(logits, _batch(params, vocab=50))
    want = logits.float().argmax(-1)
    assert ids[2] == 7 and ids[4] == FAILED
    assert torch.equal(ids[[0, 1, 2, 3]], want[[0, 1, 2, 3]]) and 0 <= ids[5] < 50


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_ids_are_argmax_first_index_over_long_tied_rows(sample, dtype):
    """Greedy rows take max()'s ids, not argmax's: over vocab-sized rows with many tied maxima (integer logits
    in a small range, so ties fall across vector lanes and threads) they are still argmax's first index."""
    logits = torch.randint(-20, 21, (64, 8192), generator=torch.Generator().manual_seed(4)).to(dtype)
    logits[5, 8000] = 30  # a lone maximum near a row's end
    logits[9, [100, 5000]] = 30  # two far apart: the first wins
    ids = sample(logits, _batch([SamplingParams()] * 64, vocab=8192))
    assert torch.equal(ids, logits.float().argmax(-1)) and ids[5] == 8000 and ids[9] == 100


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_greedy_row_with_any_non_finite_logit_fails_alone(sample, value):
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(5))
    logits[2, 299] = value  # the last column: where a vectorized reduction ends
    ids = sample(logits, _batch([SamplingParams()] * 4, vocab=300))
    assert ids[2] == FAILED
    assert torch.equal(ids[[0, 1, 3]], logits[[0, 1, 3]].argmax(-1))


def _nucleus64(w: torch.Tensor, top_p: float) -> set[int]:
    """The reference top-p cut of one row, in float64: the shortest prefix of the sorted weights whose mass
    reaches top_p of the row's total, and every token tied with its last."""
    w = w.double()
    order = torch.sort(w, descending=True)
    mass = order.values.cumsum(0) / w.sum()
    last = order.values[int((mass < top_p).sum())]
    return set(torch.nonzero(w >= last).flatten().tolist())


def test_cpu_candidates_cut_exactly_as_ranking_the_whole_vocabulary_does():
    """On the CPU the cuts rank 1,024 candidates first and the whole vocabulary only for rows whose cut reaches
    past them; the path a GPU takes (everything ranked at once) is the reference, and float64 the oracle."""
    vocab = 3000
    gen = torch.Generator().manual_seed(8)
    stds = torch.tensor([4.0, 4.0, 4.0, 4.0, 0.05]).unsqueeze(1)  # the last row is nearly flat
    logits = torch.randn(5, vocab, generator=gen) * stds
    w = (logits - logits.amax(-1, keepdim=True)).exp()
    # row 3's top-k set is wider than the candidates
    cuts = [dict(top_p=0.9), dict(top_k=50, top_p=0.8), dict(), dict(top_k=2000, top_p=0.9), dict(top_p=0.95)]
    batch = _batch([SamplingParams(temperature=1.0, **c) for c in cuts], vocab=vocab)
    assert batch.ranked == vocab and batch.k_and_p
    t_cand, decided = _thresholds(w, batch, CPU_CANDIDATES)
    t_full, everywhere = _thresholds(w, batch, vocab)
    assert decided.tolist() == [True, True, True, False, False] and everywhere.all()
    assert torch.equal(t_cand[decided], t_full[decided])
    cut = w.clone()
    _cut_support(cut, batch)  # falls back to the whole ranking for rows 3 and 4
    assert torch.equal(cut, w.masked_fill(w < t_full, 0.0))
    kept = [set(torch.nonzero(row).flatten().tolist()) for row in cut]
    assert kept[0] == _nucleus64(w[0], 0.9) and len(kept[0]) < CPU_CANDIDATES
    assert len(kept[2]) == vocab and len(kept[4]) > CPU_CANDIDATES  # no cut; a nucleus past the candidates
    assert kept[4] == _nucleus64(w[4], 0.95)
    top50 = set(torch.topk(w[1], 50).indices.tolist())
    assert kept[1] <= top50 and kept[1] == _nucleus64(w[1].masked_fill(w[1] < w[1][list(top50)].min(), 0), 0.8)


def test_sampling_leaves_the_callers_logits_as_they_were(sample):
    """The random path scales one fp32 copy in place: fp32 logits, which .float() would return as they are,
    stay untouched."""
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(6))
    before = logits.clone()
    params = [SamplingParams(temperature=0.5), SamplingParams(temperature=1.0, top_k=4), SamplingParams()]
    sample(logits, _batch(params, vocab=40), torch.Generator().manual_seed(0))
    assert torch.equal(logits, before)


def test_inverse_cdf_picks_by_cumulative_weight_and_never_a_token_without_weight():
    weights = torch.tensor([[0.5, 0.0, 1.0, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.25]])  # totals 2 and 0.25

    def pick(u: list[float]) -> list[int]:
        return _inverse_cdf(weights.clone(), torch.tensor(u)).tolist()  # the weights are overwritten

    assert pick([0.0, 0.0]) == [0, 5]  # u = 0: the first token with weight
    assert pick([0.3, 0.5]) == [2, 5]
    assert pick([0.75, 0.99]) == [3, 5]  # 0.75 of 2: past the first 1.5
    assert pick([1.0, 1.0]) == [3, 5]  # u = 1 exactly: still the last token with weight


# Mixed rows in one batch: plain temperature, top-k, top-p, both, min-p alone and with both, and a greedy row.
MIXED = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=3),
         SamplingParams(temperature=1.3, top_p=0.6), SamplingParams(temperature=1.0, top_k=5, top_p=0.8),
         SamplingParams(temperature=1.0, min_p=0.2), SamplingParams(temperature=1.5, min_p=0.2, top_k=3, top_p=0.9),
         SamplingParams()]


# Every random row with a top-k: the sampler ranks only the largest max(top_k) scores (torch.topk), not all 8.
TOP_K_ONLY = [SamplingParams(temperature=0.7, top_k=3), SamplingParams(temperature=1.0, top_k=5, top_p=0.8),
              SamplingParams(temperature=1.2, top_k=2, seed=7), SamplingParams()]


@pytest.mark.parametrize("mix", [MIXED, TOP_K_ONLY], ids=["full-sort", "top-k-only"])
def test_the_batched_distribution_equals_the_reference_per_row(sample, mix):
    torch.manual_seed(0)
    logits = torch.randn(len(mix), 8) * 1.5
    shared = torch.Generator().manual_seed(1)
    batch = _batch(mix)
    assert batch.ranked == (8 if mix is MIXED else 5)
    n = 6000
    draws = torch.stack([sample(logits, batch, shared) for _ in range(n)])  # [n, B]
    for row, p in enumerate(mix):
        freq = torch.bincount(draws[:, row], minlength=8).double() / n
        want = torch.nn.functional.one_hot(logits[row].argmax(), 8).double() if p.greedy \
            else reference_probs(logits[row], p)
        assert freq[want == 0].sum() == 0, f"row {row} sampled outside its support"
        # 4.5 standard errors of a binomial frequency per token
        tol = 4.5 * torch.sqrt(want * (1 - want) / n) + 1e-9
        assert ((freq - want).abs() <= tol).all(), (row, freq, want)


def test_a_seeded_row_samples_the_same_alone_and_in_any_batch(sample):
    torch.manual_seed(3)
    steps = [torch.randn(4, 50) for _ in range(20)]
    seeded = SamplingParams(temperature=0.9, top_p=0.9, seed=42)

    def run(rows: list[int]) -> list[int]:
        # each run builds its own generators, as a fresh request would
        params = [seeded if r == 0 else MIXED[r] for r in rows]
        batch = _batch(params, vocab=50)
        shared = torch.Generator().manual_seed(len(rows))  # other rows' draws differ between runs
        col = rows.index(0)
        return [int(sample(s[rows], batch, shared)[col]) for s in steps]

    alone = run([0])
    assert run([1, 0, 2, 3]) == alone
    assert run([3, 2, 0]) == alone
    assert len(set(alone)) > 1  # it really samples


def test_a_seeded_top_k_row_samples_the_same_whatever_the_batch_ranks(sample):
    """How many candidates the cuts rank depends on the batch (the largest top-k, or the whole vocabulary, or
    1,024 first on the CPU); a seeded row's cut and draw do not, ties at its k-th logit included."""
    vocab = 1500
    gen = torch.Generator().manual_seed(9)
    steps = [torch.randn(3, vocab, generator=gen).mul(3).round() for _ in range(25)]  # integer logits: ties
    seeded = SamplingParams(temperature=0.9, top_k=40, top_p=0.8, seed=11)
    others = {"alone": [], "wider top-k": [SamplingParams(temperature=1.0, top_k=1200)],
              "top-p only": [SamplingParams(temperature=1.0, top_p=0.7)], "greedy": [SamplingParams()]}
    runs = {}
    for name, extra in others.items():
        params = [seeded] + extra
        batch = _batch(params, vocab=vocab)
        shared = torch.Generator().manual_seed(len(name))
        runs[name] = [int(sample(s[: len(params)], batch, shared)[0]) for s in steps]
    assert {_batch([seeded] + extra, vocab=vocab).ranked for extra in others.values()} == {40, 1200, vocab}
    assert all(r == runs["alone"] for r in runs.values()) and len(set(runs["alone"])) > 1


def test_a_row_with_nan_logits_fails_alone(sample):
    logits = torch.randn(3, 8)
    logits[1, 4] = float("nan")
    params = [SamplingParams(), SamplingParams(temperature=1.0, seed=1), SamplingParams(temperature=1.0, top_k=2)]
    ids = sample(logits, _batch(params))
    assert ids[1] == FAILED and ids[0] == logits[0].argmax() and 0 <= ids[2] < 8
    logits[1] = float("inf")
    assert sample(logits, _batch([SamplingParams()] * 3))[1] == FAILED


def test_low_temperature_concentrates_and_seed_repeats(sample):
    logits = torch.tensor([[1.0, 0.5, 0.0]])
    cold = _batch([SamplingParams(temperature=0.05, seed=1)], vocab=3)
    assert all(int(sample(logits, cold)) == 0 for _ in range(200))
    draws = []
    for _ in range(2):
        batch = _batch([SamplingParams(temperature=1.0, seed=7)], vocab=3)
        draws.append([int(sample(logits, batch)) for _ in range(50)])
    assert draws[0] == draws[1] and len(set(draws[0])) > 1


def test_with_logprobs_packs_ids_and_log_softmax_in_one_tensor():
    """The host's one copy: each row's id, its log-probability and the k best, exact for ids up to Llama-3's
    vocabulary; `read_logprobs` reads back what a request asked for; a FAILED row does not fault."""
    from zeroc.sampling import FAILED, read_logprobs, with_logprobs

    logits = torch.randn(3, 128256, dtype=torch.bfloat16) * 4
    ids = torch.tensor([128255, 7, FAILED])
    rows = with_logprobs(logits, ids, 4)
    assert rows.shape == (3, 10) and rows.dtype == torch.float64
    want = logits.float().log_softmax(-1)
    host = rows.tolist()
    for row, i in zip(host[:2], ids[:2].tolist()):
        assert int(row[0]) == i
    got = read_logprobs(host[0], 4, 2)
    assert got.logprob == pytest.approx(want[0, 128255].item(), abs=1e-6)
    best = want[0].topk(2)
    assert [t for t, _ in got.top] == best.indices.tolist()
    assert [v for _, v in got.top] == pytest.approx(best.values.tolist(), abs=1e-6)
    assert int(host[2][0]) == FAILED and read_logprobs(host[1], 4, 0).top == ()
    assert with_logprobs(logits, ids, 0).shape == (3, 2)


def test_logit_bias_is_taken_as_pairs_or_a_dict_and_kept_sorted():
    assert SamplingParams(logit_bias={9: -1, 3: 2.5}).logit_bias == ((3, 2.5), (9, -1.0))
    assert SamplingParams(logit_bias=((9, -1.0), (3, 2.5))) == SamplingParams(logit_bias={3: 2.5, 9: -1.0})
    assert SamplingParams(logit_bias={3: 1.0}).penalized and not SamplingParams().penalized
