"""The prepared GPU check of the NCCL KV transport: one call, < 2 min on one H100/H200.

    python benchmarks/gpu_nccl.py --json $OUT/gpu_nccl.json     # needs a CUDA GPU and libnccl

Parts (``--parts`` picks some; each records its own error and the others still run):

1. ``selfsend``: the libnccl binding on a 1-rank communicator: ncclSend + ncclRecv to itself
   inside one group call, for 1 MiB .. 256 MiB, checking the bytes and measuring bytes/s.
2. ``timeout``: a receive with no matching send, in a child process: it must end as an
   NcclError or NcclTimeoutError within its deadline (communicator aborted), never hang.
3. ``serve``: the bundled model through real services on this one GPU: ``zeroc serve prefill
   --device cuda`` and two decode services, ``--kv-transport auto`` (which picks CUDA IPC on a
   shared GPU) and ``--kv-transport grpc``; greedy outputs must be identical; TTFT of each.

A true 2-rank NCCL transfer needs two GPUs and is not exercised here. Prints a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PARTS = ("selfsend", "timeout", "serve")
PROMPTS = ["The built-in function", "import os\nprint(os.getcwd())", "A list comprehension is a concise way to "
           "create lists. Common applications are to make new lists where each element is the result of"]


def part_selfsend(sizes_mib: list[int], repeats: int) -> dict:
    import torch

    from zeroc.transport.nccl import Communicator, load_nccl

    lib = load_nccl()
    comm = Communicator(lib, lib.unique_id(), 1, 0)
    comm.wait_ready(30)
    stream = torch.cuda.Stream()
    rows = []
    try:
        for mib in sizes_mib:
            n = mib << 20
            src = torch.randint(0, 256, (n,), dtype=torch.uint8, device="cuda")
            dst = torch.zeros_like(src)
            torch.cuda.synchronize()
            times = []
            for _ in range(repeats + 1):  # the first round warms up
                start = time.perf_counter()
                with comm.group():
                    comm.send(src.data_ptr(), n, 0, stream.cuda_stream)
                    comm.recv(dst.data_ptr(), n, 0, stream.cuda_stream)
                done = torch.cuda.Event()
                done.record(stream)
                comm.poll(done.query, 30, "self send/recv")
                times.append(time.perf_counter() - start)
            rows.append({"MiB": mib, "equal": bool(torch.equal(src, dst)),
                         "GBps": n / statistics.median(times[1:]) / 1e9})
    finally:
        comm.close()
    return {"nccl": str(lib.version), "library": lib.path, "rows": rows}


def _unmatched_recv(timeout_s: float) -> None:
    """Child process of part 2: prints one JSON line about how the lone receive ended."""
    import torch

    from zeroc.transport.nccl import Communicator, NcclError, NcclTimeoutError, load_nccl

    lib = load_nccl()
    comm = Communicator(lib, lib.unique_id(), 1, 0)
    comm.wait_ready(30)
    buf, stream = torch.empty(1 << 20, dtype=torch.uint8, device="cuda"), torch.cuda.Stream()
    start = time.perf_counter()
    try:
        with comm.group():
            comm.recv(buf.data_ptr(), buf.numel(), 0, stream.cuda_stream)
        done = torch.cuda.Event()
        done.record(stream)
        comm.poll(done.query, timeout_s, "unmatched ncclRecv")
        outcome = "completed (unexpected)"
    except NcclTimeoutError as exc:
        outcome = f"timeout: {exc}"
    except NcclError as exc:
        outcome = f"error: {exc}"
    print(json.dumps({"outcome": outcome, "seconds": time.perf_counter() - start, "aborted": not comm.alive}))


def part_timeout(timeout_s: float) -> dict:
    child = subprocess.run([sys.executable, __file__, "--child-unmatched-recv", str(timeout_s)],
                           capture_output=True, text=True, timeout=timeout_s + 90)
    if child.returncode != 0:
        raise RuntimeError(f"child exited {child.returncode}: {child.stderr[-2000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def _chosen_transport(log: str) -> str:
    for line in log.splitlines():
        if '"kv transport chosen"' in line:
            return json.loads(line).get("transport", "?")
    return "grpc (not negotiated)"


def part_serve(max_tokens: int) -> dict:
    from zeroc.client import Client
    from zeroc.stack import ServiceProcess

    procs = []
    try:
        prefill = ServiceProcess("prefill", ["--device", "cuda"])
        procs.append(prefill)
        decodes = {name: ServiceProcess("decode", ["--device", "cuda", "--prefill", prefill.address,
                                                   "--kv-transport", name]) for name in ("auto", "grpc")}
        procs += decodes.values()
        for p in procs:
            p.wait_serving()
        out = {}
        for name, proc in decodes.items():
            with Client(proc.address, timeout=120) as client:
                results = [client.generate(p, max_tokens=max_tokens, ignore_eos=True) for p in PROMPTS * 2]
            out[name] = {"transport": _chosen_transport(proc.log_tail(200_000)),
                         "tokens": [r.token_ids for r in results[:len(PROMPTS)]],
                         "ttft_ms_median": statistics.median(r.usage.ttft_ms for r in results[len(PROMPTS):]),
                         "kv_bytes": [r.usage.kv_bytes_received for r in results[:len(PROMPTS)]]}
        out["identical"] = out["auto"]["tokens"] == out["grpc"]["tokens"]
        return out
    except Exception:
        for p in procs:
            print(f"--- {p.kind} log ---\n{p.log_tail()}", file=sys.stderr)
        raise
    finally:
        for p in procs:
            p.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--sizes-mib", type=int, nargs="+", default=[1, 16, 256])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--timeout-s", type=float, default=3.0, help="deadline of the unmatched receive")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--json", default=None, help="also write the summary to this file")
    parser.add_argument("--child-unmatched-recv", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if min(args.sizes_mib) < 1 or args.repeats < 1 or args.timeout_s <= 0:
        parser.error("--sizes-mib and --repeats must be >= 1, --timeout-s > 0")
    import torch

    if not torch.cuda.is_available():
        print("gpu_nccl.py: error: needs a CUDA GPU (torch sees none); nothing was run", file=sys.stderr)
        return 2
    if args.child_unmatched_recv is not None:
        _unmatched_recv(args.child_unmatched_recv)
        return 0
    runs = {"selfsend": lambda: part_selfsend(args.sizes_mib, args.repeats),
            "timeout": lambda: part_timeout(args.timeout_s), "serve": lambda: part_serve(args.max_tokens)}
    summary = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for name in args.parts:
        started = time.perf_counter()
        try:
            summary[name] = runs[name]()
        except Exception:
            summary[name] = {"error": traceback.format_exc(limit=8)}
        summary[name]["wall_s"] = round(time.perf_counter() - started, 2)
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
