"""The harness of benchmarks/gpu_kernels.py: the report being built and its time guard, the two ways a row is
timed, and the goals and the markdown table read from the finished report."""

from __future__ import annotations

import json
import statistics
import time
import traceback

import torch


def say(*args) -> None:
    print(*args, flush=True)


class Run:
    """The report being built, the device, and the time guard."""

    def __init__(self, shapes: dict, device: torch.device, dtype: torch.dtype, repeats: int):
        self.s, self.device, self.dtype, self.repeats = shapes, device, dtype, repeats
        self.t0 = time.monotonic()
        self.report: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                             "dtype": str(dtype), "date": time.strftime("%Y-%m-%d %H:%M"), "triton": _triton_version(),
                             "torch": torch.__version__, "shapes": {k: list(v) if isinstance(v, tuple) else v
                                                                   for k, v in shapes.items()},
                             "timings": [], "errors": {}, "skipped": []}

    def left(self) -> float:
        return self.s["budget_s"] - (time.monotonic() - self.t0)

    def section(self, name: str, fn, *args) -> None:
        if self.left() <= 0:
            self.report["skipped"].append(name)
            say(f"[{name}] skipped: time guard")
            return
        start = time.monotonic()
        try:
            fn(self, *args)
            say(f"[{name}] done in {time.monotonic() - start:.1f}s")
        except Exception as e:  # one section failing must not lose the others' figures
            self.report["errors"][name] = f"{type(e).__name__}: {e}"
            say(f"[{name}] FAILED: {type(e).__name__}: {e}")
            traceback.print_exc()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def timed(self, fn) -> float:
        """Median milliseconds per call of `fn()`: calls queued back to back between two events, so host
        overhead hides behind the GPU; the first calls (autotuning, compiling) are not timed."""
        fn()
        fn()
        if self.device.type != "cuda":
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        inner = max(1, min(50, int(5e-3 / max(time.perf_counter() - t, 1e-6))))
        times = []
        for _ in range(self.repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / inner)
        return statistics.median(times)

    def timed_in_graph(self, fn, calls: int = 20) -> float:
        """Median milliseconds per call of `fn()` replayed from a CUDA graph of `calls` calls: the device time
        a decode step's graph pays. Small kernels (a [64, 4096] norm: microseconds) launch slower from Python
        than the device runs them, so `timed` would measure the launch. Off CUDA, `timed`."""
        if self.device.type != "cuda":
            return self.timed(fn)
        side = torch.cuda.Stream()  # warm up (compile, autotune) off the capture, as the engine does
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                for _ in range(calls):
                    fn()
        except RuntimeError as e:  # an op that syncs cannot be captured: its launches are what a step pays
            say(f"  (not capturable, timed eagerly: {str(e).splitlines()[0][:120]})")
            return self.timed(fn)
        return self.timed(graph.replay) / calls

    def row(self, **fields) -> dict:
        self.report["timings"].append(fields)
        return fields


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:  # pragma: no cover
        return "absent"


def goals(report: dict) -> list[dict]:
    """The speed goals of the kernels' design, each with the measured figure (None where not measured)."""
    out = []
    for method, least in (("uncompressed", 0.85), ("zeroc rank", 0.85), ("int8", 0.75), ("per-head", 0.75)):
        rows = [r for r in report["timings"] if r["section"] == "decode" and method in r["method"]
                and (method == "int8" or "int8" not in r["method"]) and "experiment" not in r["method"]]
        for r in rows:
            out.append({"goal": f"decode {r['method']}: of copy bandwidth >= {least}", "value": r.get("of_copy"),
                        "met": r.get("of_copy", 0) >= least})
    runtime = ("uncompressed", "uncompressed, fresh path")  # the kernel, and what fresh prompts take instead
    for r in (r for r in report["timings"] if r["section"] == "prefill" and r["method"] in runtime):
        least = 0.8 if "after" in r["what"] else 0.9
        out.append({"goal": f"{r['what']}: x SDPA >= {least}", "value": r["vs_sdpa"], "met": r["vs_sdpa"] >= least})
    for method, most in (("fold", 0.55), ("rotate", 0.65)):
        blocks = [r for r in report["timings"] if r["section"] == "attention block" and method in r["method"]]
        if blocks:
            r = blocks[-1]  # the longest prompt
            out.append({"goal": f"{r['what']} {method}: / uncompressed <= {most}", "value": r["ratio"],
                        "met": r["ratio"] <= most})
    return out


def table(report: dict) -> str:
    lines = [f"{report['device']} {report['dtype']} (triton {report['triton']}, torch {report['torch']})"]
    c = report.get("ceilings", {})
    if c:
        lines.append(f"copy {c['copy_GBps']:.0f} GB/s, GEMM {c['gemm_TFLOPs']:.1f} TFLOP/s")
    lines += ["", "| section | what | method | ms | of copy | TFLOP/s | SDPA ms | x SDPA | / uncompressed | config |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in report["timings"]:
        def f(key, fmt):
            return format(r[key], fmt) if isinstance(r.get(key), (int, float)) and r[key] == r[key] else ""
        cfg = json.dumps(r["config"]) if r.get("config") else ""
        lines.append(f"| {r['section']} | {r['what']} | {r['method']} | {f('ms', '.3f')} | {f('of_copy', '.0%')} | "
                     f"{f('TFLOPs', '.0f')} | {f('sdpa_ms', '.3f')} | {f('vs_sdpa', '.2f')} | {f('ratio', '.2f')} | "
                     f"{cfg} |")
    return "\n".join(lines)
