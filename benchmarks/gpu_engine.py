"""The engine's device-side runtime checked on a device, in one call (over 150 s on an H100, 2026-12-05: each
check's first engine compiles its kernels; `--checks` runs some).

On the bundled model (float32) it checks, and prints pass/fail for each:
- graphs: greedy tokens with CUDA graphs for decode steps equal those with enforce_eager (ragged prompts and
  lengths, so the decode batch shrinks through buckets), and graphs were really captured;
- syncs: a decode step makes exactly one device sync (torch.cuda.set_sync_debug_mode counts them, and the
  output names the lines each one came from);
- seeded: a seeded sampled request gives the same tokens alone and among requests of other parameters;
- extras: requests asking for log-probabilities (greedy and seeded with min_p and min_tokens; prompt ones too),
  penalties (repetition, frequency, bias) or structured output (a regex guide: its mask's one copy to the device,
  the Triton kernel applying it), beside one asking for
  neither, get, with decode steps in CUDA graphs and running ahead, the
  tokens and log-probabilities (within 1e-3) of the eager step-by-step engine, still with one sync per decode step;
- isolation: a sequence whose KV is poisoned with NaN finishes with "error" alone; the others' tokens are
  those they get alone;
- async: running ahead (scheduler.async_scheduling) with graphs streams the tokens, texts and finish reasons
  of the eager step-by-step engine (stop tokens, seeded sampling, ragged lengths), with one sync per step;
- backends: the loaded backend (triton on CUDA, with its fused norm, gate and projections) gives the greedy
  tokens of the PyTorch references;
- tier: a ZeroC model with a token tier (fold, 2 sinks, 6 recent tokens) on the loaded backend, decode steps in
  CUDA graphs (its compressed segment through the decode kernel from the sinks on), gives the greedy tokens
  of the PyTorch references run eagerly, with one sync per decode step;
- int8: the int8 KV store (`--kv-policy int8`) with decode steps in CUDA graphs gives the greedy tokens it gives
  eagerly, with one sync per decode step;
- flex: the flex backend (torch's FlexAttention for paged attention, compiled) with decode steps in CUDA graphs
  gives the greedy tokens of the PyTorch references run eagerly, with one sync per decode step (on the CPU it
  needs TRITON_INTERPRET=1, as `make test` sets).
On the CPU graphs cannot be captured: the graphs check then compares the padded static-buffer path (run
eagerly) with the unpadded one, and syncs counts host reads of tensor values instead.

    python benchmarks/gpu_engine.py --device cuda
"""

from __future__ import annotations

import argparse
import copy
import gc
import re
import sys

import torch

from zeroc.bench.step_costs import count_syncs
from zeroc.config import BUNDLED_MODEL, CacheConfig, SchedulerConfig
from zeroc.decode_runner import DecodeRunner
from zeroc.engine import Engine
from zeroc.loader import load_model
from zeroc.sampling import Guide, SamplingParams
from zeroc_kernels.attention import TorchBackend, select_backend

EMAIL = r"[a-z]{2,6}@[a-z]{2,6}\.com"  # the extras check's guide
PROMPTS = ["The built-in function", "import os\n", "A list comprehension is", "Exceptions are raised",
           "def f(x):\n    return x", "print(", "class A:", "for i in range(10):"]


def _engine(loaded, eager: bool, pad_on_cpu: bool = False, ahead: bool = False, kv_policy: str = "none") -> Engine:
    engine = Engine(loaded, CacheConfig(16, 256, kv_policy=kv_policy),
                    SchedulerConfig(max_num_seqs=8, enforce_eager=eager, async_scheduling=ahead))
    if pad_on_cpu and not engine.decode_runner.use_graphs:
        engine.decode_runner = DecodeRunner(engine.model, engine.cache, engine.state, use_graphs=False, pad=True)
    return engine


def check_graphs(loaded) -> tuple[bool, str]:
    params = [SamplingParams(max_new_tokens=4 + 3 * i, ignore_eos=True) for i in range(len(PROMPTS))]
    eager = [r.token_ids for r in _engine(loaded, True).generate(PROMPTS, params)]
    graphed_engine = _engine(loaded, False, pad_on_cpu=True)
    graphed = [r.token_ids for r in graphed_engine.generate(PROMPTS, params)]
    runner = graphed_engine.decode_runner
    what = f"captured buckets {sorted(runner.graphs)}" if runner.use_graphs else "padded eager path (no graphs here)"
    return graphed == eager, f"{what}; tokens {'equal' if graphed == eager else 'DIFFER'} to eager"


def _syncs_per_step(engine: Engine, steps: int = 2) -> list[int]:
    """Device syncs in each of `steps` decode steps after the prompts and two decode steps (the first captures
    the graph). Two steps, counted apart: on the H100 (2026-12-05) this check's one counted step made 2 where the
    engine bench's made 1, so a sync made once (in the process's first counting window, say) shows as [2, 1] and
    one made in every step as [2, 2]."""
    for p in PROMPTS:
        engine.add_request(p, SamplingParams(max_new_tokens=8, ignore_eos=True))
    for _ in range(3):  # prefill, then decode steps (the first captures the graph)
        engine.step()
    # Earlier checks' engines (their graphs, pools, pinned buffers) are freed now, not by a collection that may
    # fall inside the counted step: what is counted is this engine's step.
    gc.collect()
    counts = []
    for _ in range(steps):
        waits = engine.host_waits
        with count_syncs(engine.device) as n:
            engine.step()
        if n[1:]:
            print(f"  syncs at {n[1:]}", flush=True)
        # on CUDA the engine waits on an event for its pinned copy of the ids, which the sync debug mode ignores
        counts.append(n[0] + (engine.host_waits - waits if engine.device.type == "cuda" else 0))
    return counts


def check_syncs(loaded) -> tuple[bool, str]:
    counts = _syncs_per_step(_engine(loaded, False))
    return counts == [1] * len(counts), f"{counts} in consecutive decode steps (want 1 each)"


def check_seeded(loaded) -> tuple[bool, str]:
    seeded = SamplingParams(max_new_tokens=12, temperature=1.0, top_k=40, top_p=0.9, seed=5, ignore_eos=True)
    alone = _engine(loaded, False).generate([PROMPTS[1]], seeded)[0].token_ids
    others = [SamplingParams(max_new_tokens=6, temperature=0.7, top_p=0.8, ignore_eos=True), seeded,
              SamplingParams(max_new_tokens=12, ignore_eos=True),
              SamplingParams(max_new_tokens=9, temperature=1.2, seed=9, ignore_eos=True)]
    mixed = _engine(loaded, False).generate(PROMPTS[:4], others)[1].token_ids
    return mixed == alone, f"alone {alone[:6]}... {'==' if mixed == alone else '!='} in a batch"


def check_extras(loaded) -> tuple[bool, str]:
    params = [SamplingParams(max_new_tokens=8, ignore_eos=True, logprobs=5, prompt_logprobs=3),
              # min_p's cut, and EOS out of reach by min_tokens (zeroc.penalties.ban_tokens) until the last token
              SamplingParams(max_new_tokens=8, temperature=0.9, seed=3, logprobs=0, min_p=0.05, min_tokens=8),
              SamplingParams(max_new_tokens=8, ignore_eos=True),
              SamplingParams(max_new_tokens=8, ignore_eos=True, repetition_penalty=1.3, frequency_penalty=0.5,
                             logit_bias=((5, 2.0), (9, -100.0))),
              SamplingParams(max_new_tokens=24, temperature=0.9, seed=4, guide=Guide("regex", EMAIL))]
    eager = _engine(loaded, True).generate(PROMPTS[:5], params)
    graphed = _engine(loaded, False, pad_on_cpu=True, ahead=True).generate(PROMPTS[:5], params)
    same_tokens = [r.token_ids for r in eager] == [r.token_ids for r in graphed]
    worst = max(abs(a.logprob - b.logprob) for x, y in zip(eager, graphed)
                for a, b in zip(x.logprobs + (x.prompt_logprobs or ()), y.logprobs + (y.prompt_logprobs or ())))
    shapes = ([len(r.logprobs) for r in graphed] == [8, 8, 0, 0, 0] and len(graphed[0].logprobs[0].top) == 5
              and len(graphed[0].prompt_logprobs) == len(graphed[0].prompt_token_ids) - 1
              and re.fullmatch(EMAIL, graphed[4].text) is not None)
    engine = _engine(loaded, False)
    for p, sp in zip(PROMPTS[:3], (params[0], params[3], params[4])):
        engine.add_request(p, sp)
    for _ in range(3):
        engine.step()
    waits = engine.host_waits
    with count_syncs(engine.device) as n:
        engine.step()
    syncs = n[0] + (engine.host_waits - waits if engine.device.type == "cuda" else 0)
    ok = same_tokens and shapes and worst <= 1e-3 and syncs == 1
    return ok, f"tokens {'equal' if same_tokens else 'DIFFER'}, max logprob gap {worst:.2e}, {syncs} sync(s) a step"


def check_isolation(loaded) -> tuple[bool, str]:
    greedy = SamplingParams(max_new_tokens=8, ignore_eos=True)
    engine = _engine(loaded, False)
    ok_ids = [engine.add_request(PROMPTS[i], greedy) for i in (0, 2)]
    bad = engine.add_request(PROMPTS[1], greedy)
    outs: dict[str, list] = {rid: [] for rid in ok_ids + [bad]}
    steps = 0
    while engine.has_unfinished():
        for o in engine.step():
            outs[o.request_id].append(o)
        steps += 1
        if steps == 1:  # the prompts are in: NaN into one sequence's blocks of every layer
            for layer in range(engine.cache.num_layers):
                engine.cache.layer(layer)[0][engine.cache.block_table(bad)] = float("nan")
    alone = [_engine(loaded, False).generate([PROMPTS[i]], greedy)[0].token_ids for i in (0, 2)]
    got = [[t for o in outs[rid] for t in o.token_ids] for rid in ok_ids]
    failed = outs[bad][-1].finish_reason == "error"
    return failed and got == alone, f"poisoned: {outs[bad][-1].finish_reason}; others equal alone: {got == alone}"


def check_async(loaded) -> tuple[bool, str]:
    free = _engine(loaded, True).generate([PROMPTS[0]], SamplingParams(max_new_tokens=12, ignore_eos=True))[0]
    params = [SamplingParams(max_new_tokens=4 + 3 * i, ignore_eos=True) for i in range(len(PROMPTS))]
    params[0] = SamplingParams(max_new_tokens=12, stop_token_ids=(free.token_ids[5],))
    params[3] = SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.9, seed=3, ignore_eos=True)

    def streams(engine: Engine) -> list[tuple]:
        return [(r.token_ids, r.text, r.finish_reason) for r in engine.generate(PROMPTS, params)]

    same = streams(_engine(loaded, False, ahead=True)) == streams(_engine(loaded, True))
    syncs = _syncs_per_step(_engine(loaded, False, ahead=True))
    return same and set(syncs) == {1}, f"streams {'equal' if same else 'DIFFER'} to eager sync; syncs per step {syncs}"


def check_backends(loaded) -> tuple[bool, str]:
    """The loaded backend (triton on CUDA: its attention kernels, fused epilogue, norm, gate and projections)
    against the PyTorch references through the same engine: greedy tokens equal."""
    params = [SamplingParams(max_new_tokens=10, ignore_eos=True)] * len(PROMPTS)
    reference = copy.deepcopy(loaded)
    reference.model.backend = TorchBackend()
    want = [r.token_ids for r in _engine(reference, True).generate(PROMPTS, params)]
    engine = _engine(loaded, False)
    got = [r.token_ids for r in engine.generate(PROMPTS, params)]
    fused = engine.model.model.layers[0].self_attn.qkv is not None
    return got == want, (f"{engine.model.backend.name} (projections {'fused' if fused else 'separate'}) tokens "
                         f"{'equal' if got == want else 'DIFFER from'} the torch backend's")


def _tiered(device: str):
    """The bundled model at Q/K rank 32 and V rank 16 (fold) with a token tier of 2 sinks and 6 recent tokens,
    fitted on random tokens (quality is not the point), loaded on `device` with its default backend."""
    import tempfile

    from zeroc.compression.calibrate import collect_statistics, compute_factors
    from zeroc.compression.fold import build_compressed
    from zeroc.config import AttentionCompression
    from zeroc.loader import save_model

    base = load_model(BUNDLED_MODEL)
    calib = torch.randint(0, base.config.vocab_size, (2, 128), generator=torch.Generator().manual_seed(3))
    factors = compute_factors(base.model, collect_statistics(base.model, calib, progress=False, sample_tokens=128))
    layout = AttentionCompression(tuple(f.layer_compression(32, 16, "fold") for f in factors), "gpu-engine-tier",
                                  0.375, "zeroc-fold", sinks=2, recent=6)
    with tempfile.TemporaryDirectory() as tmp:
        return load_model(save_model(build_compressed(base.model, factors, layout), base.tokenizer, tmp),
                          device=device)


def _graphed_against(loaded, reference, kv_policy: str = "none") -> tuple[bool, str]:
    """Greedy tokens of `loaded` with its decode steps in CUDA graphs (the padded path on the CPU) against
    `reference`'s run eagerly, graphs really captured on CUDA, and one sync per decode step."""
    params = [SamplingParams(max_new_tokens=4 + 3 * i, ignore_eos=True) for i in range(len(PROMPTS))]
    want = [r.token_ids for r in _engine(reference, True, kv_policy=kv_policy).generate(PROMPTS, params)]
    engine = _engine(loaded, False, pad_on_cpu=True, kv_policy=kv_policy)
    got = [r.token_ids for r in engine.generate(PROMPTS, params)]
    runner, syncs = engine.decode_runner, _syncs_per_step(_engine(loaded, False, kv_policy=kv_policy))
    graphs = runner.use_graphs or engine.device.type != "cuda"
    what = f"captured buckets {sorted(runner.graphs)}" if runner.use_graphs else "no graphs"
    return got == want and set(syncs) == {1} and graphs, (
        f"{loaded.model.backend.name}, {what}: tokens {'equal' if got == want else 'DIFFER from'} the "
        f"{reference.model.backend.name} backend's eager ones; syncs per decode step {syncs}")


def check_tier(loaded) -> tuple[bool, str]:
    tiered = _tiered(str(loaded.model.lm_head.weight.device))
    reference = copy.deepcopy(tiered)
    reference.model.backend = TorchBackend()
    return _graphed_against(tiered, reference)


def check_int8(loaded) -> tuple[bool, str]:
    return _graphed_against(loaded, loaded, kv_policy="int8")


def check_flex(loaded) -> tuple[bool, str]:
    flex = copy.deepcopy(loaded)
    flex.model.backend = select_backend("flex", loaded.model.lm_head.weight.device)
    reference = copy.deepcopy(loaded)
    reference.model.backend = TorchBackend()
    return _graphed_against(flex, reference)


def check_speculative(loaded) -> tuple[bool, str]:
    """Speculating greedy rows and a seeded sampled one (zeroc/speculative.py) beside graphed ones, running ahead
    between them: the eager engine's tokens, in fewer steps."""
    prompts = ["def add(a, b):\n    return a + b\n\ndef add(a, b):\n", *PROMPTS[:3]]
    params = [SamplingParams(max_new_tokens=40, ignore_eos=True)] * 3 + [SamplingParams(max_new_tokens=40,
                                                                                       temperature=0.9, seed=2)]
    eager = _engine(loaded, True).generate(prompts, params)
    engine = Engine(loaded, CacheConfig(16, 256), SchedulerConfig(max_num_seqs=8, async_scheduling=True,
                                                                  speculative_tokens=4))
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    outs, steps = {rid: [] for rid in ids}, 0  # steps: those giving the repeating prompt's request tokens
    while engine.has_unfinished():
        for o in engine.step():
            outs[o.request_id] += o.token_ids
            steps += o.request_id == ids[0] and bool(o.token_ids)
    same = [outs[rid] for rid in ids] == [r.token_ids for r in eager]
    return same and steps < 40, f"tokens {'equal' if same else 'DIFFER'}, the repeating prompt's 40 in {steps} steps"


# flex last: its compiles (seconds each) are what a time box should cut first
CHECKS = {"graphs": check_graphs, "syncs": check_syncs, "seeded": check_seeded, "extras": check_extras,
          "isolation": check_isolation, "speculative": check_speculative,
          "async": check_async, "backends": check_backends, "tier": check_tier, "int8": check_int8,
          "flex": check_flex}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--checks", nargs="+", choices=list(CHECKS), default=list(CHECKS),
                   help="which checks (default: all)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    loaded = load_model(BUNDLED_MODEL, device=args.device)
    results = []
    for name in args.checks:
        check = CHECKS[name]
        try:
            ok, detail = check(loaded)
        except Exception as exc:  # report, run the rest
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        results.append(ok)
        print(f"{name:<10} {'pass' if ok else 'FAIL'}  {detail}", flush=True)
    print(f"all pass: {all(results)}")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
