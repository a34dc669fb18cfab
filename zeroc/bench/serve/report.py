"""The serving benchmark's report: the issue's goals checked from the rows, markdown, JSON and plots.

Definitions used for the goals (computed per mode of the memory scenario):
- saturation rate: the lowest swept request rate at which the uncompressed stack's mean JCT is at
  least twice its unloaded JCT (queueing has set in); the highest rate if none is. Unloaded JCT:
  the rate probe's (one request alone) where the rates were automatic, else the lowest rate's;
- JCT cut: 1 - mean JCT(ZeroC 0.5) / mean JCT(none) at that rate;
- throughput at equal p99: the uncompressed stack's p99 JCT at the saturation rate is the bar;
  each method's request throughput where its p99 JCT reaches that bar, interpolated linearly
  between the swept rates (its best throughput if it never reaches the bar).
"""

from __future__ import annotations

import json
from pathlib import Path

from zeroc.bench.serve.methods import method_rank

BASE, ZEROC_MAIN = "none", "zeroc-0.5"
JCT_CUT_GOAL, THROUGHPUT_GOAL = 0.40, 1.5
# (ZeroC method, baseline) pairs compared at equal cache bytes, nearest nominal KV fraction.
EQUAL_BYTES_PAIRS = (("zeroc-0.5", "h2o-0.5"), ("zeroc-0.25", "h2o-0.25"), ("zeroc-0.25", "kivi-4"))


def _series(rows: list[dict], scenario: str, mode: str, method: str, link=None) -> list[dict]:
    pts = [r for r in rows if r["scenario"] == scenario and r["mode"] == mode and r["method"] == method
           and r.get("link_mbit") == link]
    return sorted(pts, key=lambda r: r["rate"])


def saturation_rate(base: list[dict], unloaded_ms: float | None = None) -> tuple[float, bool]:
    """(rate, whether queueing was seen) for the uncompressed series sorted by rate."""
    floor = unloaded_ms or base[0]["summary"]["e2e"]["mean"]
    for row in base:
        if row["summary"]["e2e"]["mean"] >= 2 * floor:
            return row["rate"], True
    return base[-1]["rate"], False


def throughput_at_p99(series: list[dict], bar_ms: float) -> float:
    """Request throughput where the p99 JCT reaches `bar_ms` along a series sorted by rate."""
    best = 0.0
    prev = None
    for row in series:
        p99, thr = row["summary"]["e2e"]["p99"], row["summary"]["request_throughput"]
        if p99 <= bar_ms:
            best = max(best, thr)
        elif prev is not None and prev[0] <= bar_ms:
            frac = (bar_ms - prev[0]) / (p99 - prev[0])
            best = max(best, prev[1] + frac * (thr - prev[1]))
        prev = (p99, thr)
    return best


def analyse_mode(rows: list[dict], mode: str, unloaded_ms: float | None = None) -> dict | None:
    """The goals for one mode of the memory scenario (None without an uncompressed series)."""
    base = _series(rows, "memory", mode, BASE)
    if not base:
        return None
    rate, saturated = saturation_rate(base, unloaded_ms)
    at = {r["method"]: r["summary"] for r in rows if r["scenario"] == "memory" and r["mode"] == mode
          and r["rate"] == rate}
    bar = at[BASE]["e2e"]["p99"]
    methods = sorted({r["method"] for r in rows if r["scenario"] == "memory" and r["mode"] == mode})
    thr = {m: throughput_at_p99(_series(rows, "memory", mode, m), bar) for m in methods}
    out = {"mode": mode, "saturation_rate": rate, "saturated": saturated, "p99_bar_ms": bar,
           "unloaded_jct_ms": unloaded_ms or base[0]["summary"]["e2e"]["mean"],
           "mean_jct_ms": {m: s["e2e"]["mean"] for m, s in at.items()},
           "throughput_at_equal_p99": thr,
           "throughput_ratio": {m: (thr[m] / thr[BASE] if thr[BASE] else None) for m in methods}}
    if ZEROC_MAIN in at:
        out["jct_cut"] = 1 - at[ZEROC_MAIN]["e2e"]["mean"] / at[BASE]["e2e"]["mean"]
    out["equal_bytes"] = [{"zeroc": z, "baseline": b, "zeroc_jct_ms": at[z]["e2e"]["mean"],
                           "baseline_jct_ms": at[b]["e2e"]["mean"]}
                          for z, b in EQUAL_BYTES_PAIRS if z in at and b in at]
    return out


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**met**" if ok else "**not met**")


def _cut_text(cut: float, zeroc_ms: float, base_ms: float) -> str:
    change = f"{cut:.1%} lower" if cut >= 0 else f"{-cut:.1%} higher"
    return f"mean JCT {change} ({zeroc_ms:.0f} vs {base_ms:.0f} ms)"


def goals_table(analyses: list[dict]) -> list[str]:
    lines = ["| mode | goal | measured | verdict |", "|---|---|---|---|"]
    for a in analyses:
        sat = f"{a['saturation_rate']:g} req/s" + ("" if a["saturated"] else ", the highest swept: JCT never doubled")
        sat += f"; unloaded JCT {a['unloaded_jct_ms'] / 1000:.1f} s"
        cut = a.get("jct_cut")
        lines.append(f"| {a['mode']} | ZeroC 0.5 cuts mean JCT >= 40% at the uncompressed saturation rate "
                     f"({sat}) | " + ("-" if cut is None else _cut_text(cut, a['mean_jct_ms'][ZEROC_MAIN],
                                                                      a['mean_jct_ms'][BASE]))
                     + f" | {_verdict(None if cut is None else cut >= JCT_CUT_GOAL)} |")
        if a["equal_bytes"]:
            for pair in a["equal_bytes"]:
                ok = pair["zeroc_jct_ms"] < pair["baseline_jct_ms"]
                lines.append(f"| {a['mode']} | {pair['zeroc']} lower mean JCT than {pair['baseline']} (equal cache "
                             f"bytes) | {pair['zeroc_jct_ms']:.0f} vs {pair['baseline_jct_ms']:.0f} ms | "
                             f"{_verdict(ok)} |")
        else:
            lines.append(f"| {a['mode']} | ZeroC lower mean JCT than KIVI and H2O at equal bytes | not measured "
                         "(see skipped) | n/a |")
        ratio = a["throughput_ratio"].get(ZEROC_MAIN)
        lines.append(f"| {a['mode']} | ZeroC 0.5 throughput at equal p99 JCT ({a['p99_bar_ms']:.0f} ms) >= 1.5x "
                     f"uncompressed | " + ("-" if ratio is None else f"{ratio:.2f}x") +
                     f" | {_verdict(None if ratio is None else ratio >= THROUGHPUT_GOAL)} |")
    return lines


def _fmt_row(row: dict) -> str:
    s = row["summary"]
    mb = s["kv_bytes_per_request"] / 1e6
    link = "-" if row.get("link_mbit") is None else f"{row['link_mbit']:g}"
    return (f"| {row['method']} | {link} | {row['rate']:g} | {s['completed']}/{s['completed'] + s['failed']} | "
            f"{s['request_throughput']:.3f} | {s['output_throughput']:.1f} | {s['goodput']:.3f} | "
            f"{s['ttft']['mean']:.0f} / {s['ttft']['p99']:.0f} | {s['tpot']['mean']:.1f} / {s['tpot']['p99']:.1f} | "
            f"{s['itl']['mean']:.1f} / {s['itl']['p99']:.1f} | {s['e2e']['mean']:.0f} / {s['e2e']['median']:.0f} / "
            f"{s['e2e']['p99']:.0f} | {s['queue']['mean']:.0f} | {mb:.2f} | {s['prefix_hit_rate']:.2f} | "
            f"{s['preemptions']} |")


TABLE_HEAD = ["| method | link Mbit/s | rate req/s | ok | req/s | out tok/s | goodput req/s | TTFT mean / p99 ms | "
              "TPOT mean / p99 ms | ITL mean / p99 ms | JCT mean / median / p99 ms | queue mean ms | KV MB/req | "
              "prefix hit | preempt |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]


def results_tables(rows: list[dict]) -> list[str]:
    lines: list[str] = []
    groups = sorted({(r["scenario"], r["mode"], r.get("workload", "")) for r in rows})
    for scenario, mode, workload in groups:
        lines += ["", f"### {scenario} / {mode} (workload: {workload})", "", *TABLE_HEAD]
        mine = [r for r in rows if (r["scenario"], r["mode"]) == (scenario, mode)]
        mine.sort(key=lambda r: (-(r.get("link_mbit") or 1e9), r["rate"], method_rank(r["method"])))
        lines += [_fmt_row(r) for r in mine]
    return lines


def write_report(results, meta: dict, out_dir: str | Path) -> dict[str, Path]:
    """serve.json, serve.md and the plots under `out_dir`; returns their paths."""
    from zeroc.bench.serve.plots import plot_latency, plot_network, plot_throughput

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = results.rows
    probes = {p["mode"]: p["jct_s"] * 1000 for p in results.probes if p["scenario"] == "memory" and p["method"] == BASE}
    analyses = [a for a in (analyse_mode(rows, m, probes.get(m)) for m in ("colocated", "disaggregated")) if a]
    paths = {"json": out / "serve.json", "markdown": out / "serve.md"}
    for plotted in (plot_latency(rows, out), plot_throughput(analyses, out), plot_network(rows, out)):
        paths.update(plotted)
    paths["json"].write_text(json.dumps({"meta": meta, "goals": analyses, "skipped": results.skipped,
                                         "topology": results.topology, "probes": results.probes, "rows": rows},
                                        indent=1) + "\n")
    md = ["# Serving benchmark (`zeroc bench serve`)", ""]
    md += [f"- **{k}**: {v}" for k, v in meta.items()]
    md += [f"- **topology ({k})**: {v}" for k, v in results.topology.items()]
    md += [f"- **automatic rates ({p['scenario']} / {p['mode']})**: one request alone on {p['method']} took "
           f"{p['jct_s']:.1f} s -> rates {', '.join(f'{r:g}' for r in p['rates'])} req/s" for p in results.probes]
    md += ["", "Definitions: see `zeroc/bench/serve/metrics.py` and `report.py` (TTFT, TPOT, ITL and JCT as "
           "`vllm bench serve`; saturation = the lowest swept rate at which the uncompressed mean JCT reaches twice "
           "its unloaded JCT, that of a lone request; queue = server-reported wait for KV space or a batch slot).",
           ""]
    if analyses:
        md += ["## Goals", "", *goals_table(analyses), ""]
    if results.skipped:
        md += ["## Not run", "", "| scenario | mode | method | why |", "|---|---|---|---|"]
        md += [f"| {s['scenario']} | {s['mode']} | {s['method']} | {s['reason'].splitlines()[0][:200]} |"
               for s in results.skipped]
        md.append("")
    for key in ("latency_plot", "throughput_plot", "network_plot"):
        if key in paths:
            md.append(f"![{key}]({paths[key].name})")
    md += ["", "## Results", *results_tables(rows), ""]
    paths["markdown"].write_text("\n".join(md))
    return paths
