"""The CPU sampler (kernels/csrc/sampling.cpp, `sample_rows`) against its reference, zeroc.sampling's torch path:
the same ids for the same uniforms, row by row. Each case sweeps u over a grid of [0, 1), so equal ids mean the
same cut and the same cumulative weights, not one lucky draw."""

from __future__ import annotations

import pytest
import torch

from zeroc.sampling import FAILED, SamplingBatch, SamplingParams, _cut_support, _inverse_cdf, sample_batch

CPU = torch.device("cpu")
GRID = 257  # uniforms a case sweeps: 0, 1/257, ..., 256/257


@pytest.fixture(scope="module")
def kernel(cpu_kernel):
    return cpu_kernel


def torch_ids(logits: torch.Tensor, batch: SamplingBatch, u: torch.Tensor) -> torch.Tensor:
    """The torch path of `sample_batch` with given uniforms u [B]: logits [B, V] -> ids [B]."""
    x = logits.to(torch.float32, copy=True)
    top, ids = x.max(dim=-1)
    bad = ~(torch.isfinite(top) & torch.isfinite(x.amin(dim=-1)))
    weights = x.sub_(top.unsqueeze(1)).div_(batch.temperature.unsqueeze(1)).exp_()
    if batch.min_p is not None:
        weights.masked_fill_(weights < batch.min_p.unsqueeze(1), 0.0)
    if batch.cuts:
        _cut_support(weights, batch)
    ids = torch.where(batch.greedy, ids, _inverse_cdf(weights, u))
    return ids.masked_fill(bad, FAILED)


def kernel_ids(kernel, logits: torch.Tensor, batch: SamplingBatch, u: torch.Tensor) -> torch.Tensor:
    if not batch.random_rows:  # an all-greedy batch carries no parameter tensors
        return kernel.sample_rows(logits)
    return kernel.sample_rows(logits, batch.temperature, batch.top_k, batch.top_p, batch.greedy, u, batch.min_p)


def sweep(kernel, logits: torch.Tensor, params: list[SamplingParams]) -> tuple[torch.Tensor, torch.Tensor]:
    """Both samplers' ids for every u of the grid: -> (kernel [GRID, B], torch [GRID, B])."""
    batch = SamplingBatch.build(params, [None] * len(params), logits.shape[1], CPU)
    got, want = [], []
    for i in range(GRID):
        u = torch.full((len(params),), i / GRID)
        got.append(kernel_ids(kernel, logits, batch, u))
        want.append(torch_ids(logits, batch, u))
    return torch.stack(got), torch.stack(want)


# One batch, every kind of row: greedy; temperature alone; top-k by the heap (k <= 128) and by the radix select
# (k > 128), 1 and V - 1 included; top-p tight and wide; both cuts; min-p alone and with each of them.
PARAMS = [SamplingParams(), SamplingParams(temperature=0.5), SamplingParams(temperature=1.7),
          SamplingParams(temperature=1.0, top_k=1), SamplingParams(temperature=0.8, top_k=50),
          SamplingParams(temperature=1.0, top_k=128), SamplingParams(temperature=1.0, top_k=129),
          SamplingParams(temperature=1.2, top_k=1000), SamplingParams(temperature=1.0, top_k=2999),
          SamplingParams(temperature=0.8, top_p=0.1), SamplingParams(temperature=0.8, top_p=0.9),
          SamplingParams(temperature=1.0, top_p=0.99), SamplingParams(temperature=0.8, top_k=50, top_p=0.9),
          SamplingParams(temperature=1.0, top_k=700, top_p=0.95), SamplingParams(temperature=1.0, min_p=0.05),
          SamplingParams(temperature=1.5, min_p=0.3), SamplingParams(temperature=1.0, min_p=0.1, top_k=40),
          SamplingParams(temperature=1.0, min_p=0.02, top_k=500, top_p=0.9), SamplingParams(temperature=0.9, min_p=0.2,
                                                                                         top_p=0.5)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("std", [0.3, 2.0, 6.0], ids=["flat", "medium", "peaked"])
def test_every_kind_of_row_gets_the_torch_paths_ids_for_every_draw(kernel, dtype, std):
    vocab = 3000
    logits = (torch.randn(len(PARAMS), vocab, generator=torch.Generator().manual_seed(int(std * 10))) * std)
    got, want = sweep(kernel, logits.to(dtype), PARAMS)
    assert torch.equal(got, want)
    assert (got[:, 1:].T.unique(dim=1).shape[1] > 1)  # the random rows really sample: ids vary with u


def test_ties_at_the_cut_stay_as_the_torch_path_keeps_them(kernel):
    """Integer logits tie everywhere: a top-k set keeps every token tied with its k-th, a nucleus every token tied
    with its last, for the heap, the radix select and the nucleus alike."""
    vocab = 2000
    logits = torch.randint(-6, 7, (10, vocab), generator=torch.Generator().manual_seed(2)).float()
    params = [SamplingParams(temperature=1.0, top_k=k) for k in (1, 7, 128, 129, 500)] + \
             [SamplingParams(temperature=0.7, top_p=p) for p in (0.05, 0.5)] + \
             [SamplingParams(temperature=0.7, top_k=300, top_p=0.5), SamplingParams(temperature=1.0, min_p=0.3),
              SamplingParams(temperature=1.0, min_p=0.05, top_k=1000)]
    got, want = sweep(kernel, logits, params)
    assert torch.equal(got, want)
    top = logits[1].topk(7).values[-1]  # row 1 keeps its 7 largest and every tie with the 7th
    assert set(got[:, 1].tolist()) <= set(torch.nonzero(logits[1] >= top).flatten().tolist())


@pytest.mark.parametrize("vocab", [1, 5, 37, 8193])
def test_vocabularies_of_any_length(kernel, vocab):
    """Lengths that are not whole vectors or chunks: the tails of the scans and of the vectorised exp."""
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(vocab)) * 3
    params = [SamplingParams(), SamplingParams(temperature=0.9), SamplingParams(temperature=1.0, top_k=min(3, vocab)),
              SamplingParams(temperature=1.0, top_p=0.7)]
    got, want = sweep(kernel, logits, params)
    assert torch.equal(got, want)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_row_with_a_non_finite_logit_fails_alone(kernel, value):
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(5))
    logits[[1, 2], [299, 0]] = value  # a random row and a greedy one, at either end
    params = [SamplingParams(temperature=1.0), SamplingParams(temperature=1.0, top_p=0.9), SamplingParams(),
              SamplingParams(temperature=1.0, top_k=5)]
    got, want = sweep(kernel, logits, params)
    assert torch.equal(got, want)
    assert (got[:, [1, 2]] == FAILED).all() and (got[:, [0, 3]] >= 0).all()


@pytest.mark.parametrize("threads", [1, 2])
def test_a_rows_id_does_not_depend_on_its_batch(kernel, threads):
    """With two threads the batch's rows are shared out in a team, and a lone row runs on the calling thread."""
    logits = torch.randn(len(PARAMS), 3000, generator=torch.Generator().manual_seed(7)) * 2
    batch = SamplingBatch.build(PARAMS, [None] * len(PARAMS), 3000, CPU)
    u = torch.rand(len(PARAMS), generator=torch.Generator().manual_seed(8))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        together = kernel_ids(kernel, logits, batch, u)
        for row, p in enumerate(PARAMS):
            alone = SamplingBatch.build([p], [None], 3000, CPU)
            assert kernel_ids(kernel, logits[row: row + 1], alone, u[row: row + 1]).item() == together[row]
    finally:
        torch.set_num_threads(before)
    assert torch.equal(together, torch_ids(logits, batch, u))


def test_sample_batch_with_the_kernel_draws_as_the_torch_path_does(kernel):
    """Through `sample_batch`: the same shared and seeded draws, so the same ids, fp16 logits included."""
    params = PARAMS[:6] + [SamplingParams(temperature=0.9, top_p=0.9, seed=3)]
    logits = (torch.randn(len(params), 500, generator=torch.Generator().manual_seed(9)) * 2).half()
    ids = []
    for native in (None, kernel):
        gens = [torch.Generator().manual_seed(3) if p.seed is not None else None for p in params]
        batch = SamplingBatch.build(params, gens, 500, CPU)
        shared = torch.Generator().manual_seed(4)
        ids.append(torch.stack([sample_batch(logits, batch, shared, native) for _ in range(30)]))
    assert torch.equal(ids[0], ids[1])


@pytest.mark.parametrize("change, message", [
    (lambda a: {**a, "logits": a["logits"].double()}, "float32 or bfloat16"),
    (lambda a: {**a, "logits": a["logits"][0]}, r"\[B, V\]"),
    (lambda a: {**a, "u": a["u"][:1]}, "one value per row"),
    (lambda a: {**a, "top_k": torch.zeros(2, dtype=torch.long)}, "top_k"),
    (lambda a: {**a, "top_k": torch.full((2,), 11)}, "top_k"),
    (lambda a: {**a, "temperature": torch.zeros(2)}, "temperature"),
    (lambda a: {**a, "top_p": torch.full((2,), 1.5)}, "top_p"),
    (lambda a: {**a, "u": None}, "every parameter, or none"),
    (lambda a: {**a, "min_p": torch.full((2,), 1.5)}, "min_p"),
    (lambda a: {**a, "min_p": torch.full((2,), float("nan"))}, "min_p"),
    (lambda a: {**a, "min_p": torch.zeros(3)}, "one value per row"),
    (lambda a: {"logits": a["logits"], "min_p": torch.zeros(2)}, "every parameter, or none"),
])
def test_bad_arguments_raise_value_error(kernel, change, message):
    args = dict(logits=torch.randn(2, 10), temperature=torch.ones(2), top_k=torch.full((2,), 10),
                top_p=torch.ones(2), greedy=torch.zeros(2, dtype=torch.bool), u=torch.rand(2))
    with pytest.raises(ValueError, match=message):
        kernel.sample_rows(**change(args))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_draws_on_the_cdfs_steps_agree_bit_for_bit(kernel, dtype):
    """A uniform that lands exactly on a step of the torch path's cumulative weights picks the next token there;
    the kernel picks the same one only if its weights, cut and prefix sums are the torch path's to the last bit
    (a grid of uniforms would not see a one-ulp difference)."""
    vocab = 3000
    params = [SamplingParams(temperature=0.7), SamplingParams(temperature=1.3, top_k=50),
              SamplingParams(temperature=1.0, top_k=500)]
    logits = (torch.randn(len(params), vocab, generator=torch.Generator().manual_seed(11)) * 3).to(dtype)
    batch = SamplingBatch.build(params, [None] * len(params), vocab, CPU)
    x = logits.float()
    weights = (x - x.amax(-1, keepdim=True)).div_(batch.temperature.unsqueeze(1)).exp_()
    _cut_support(weights, batch)
    cdf = weights.cumsum(-1)  # [B, V] what _inverse_cdf searches
    checked = 0
    for step in range(0, vocab - 1, 7):
        u = (cdf[:, step] / cdf[:, -1]).float()  # [B]
        # v is the step itself, below the total (there the pick is clamped to the last token with weight)
        exact = (u * cdf[:, -1] == cdf[:, step]) & (weights[:, step] > 0) & (cdf[:, step] < cdf[:, -1])
        if not exact.any():
            continue
        got, want = kernel_ids(kernel, logits, batch, u), torch_ids(logits, batch, u)
        assert torch.equal(got[exact], want[exact]), step
        assert (want[exact] > step).all()  # the pick is past the step: these uniforms sit on the boundary
        checked += int(exact.sum())
    assert checked > 100
