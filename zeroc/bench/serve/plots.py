"""The serving benchmark's plots (matplotlib, PNG): latency vs request rate, throughput at equal p99
JCT, and JCT / TTFT per link rate."""

from __future__ import annotations

from pathlib import Path

import matplotlib

from zeroc.bench.serve.methods import method_rank

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _methods(rows: list[dict]) -> list[str]:
    """The methods in `rows`, in `all_methods()` order (others after them)."""
    return sorted({r["method"] for r in rows}, key=method_rank)


def _color(method: str) -> str:
    """One colour per method in every plot."""
    return f"C{method_rank(method)[0] % 10}"


def _save(fig, title: str, path: Path) -> Path:
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_latency(rows: list[dict], out: Path) -> dict[str, Path]:
    """Mean (solid) and p99 (dashed) JCT against the offered rate, one panel per unshaped scenario/mode."""
    panels = sorted({(r["scenario"], r["mode"]) for r in rows if r.get("link_mbit") is None})
    if not panels:
        return {}
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (scenario, mode) in zip(axes[0], panels):
        mine = [r for r in rows if (r["scenario"], r["mode"]) == (scenario, mode) and r.get("link_mbit") is None]
        for method in _methods(mine):
            pts = sorted((r for r in mine if r["method"] == method), key=lambda r: r["rate"])
            rates = [r["rate"] for r in pts]
            color = _color(method)
            ax.plot(rates, [r["summary"]["e2e"]["mean"] / 1000 for r in pts], "o-", color=color,
                    label=f"{method} mean")
            ax.plot(rates, [r["summary"]["e2e"]["p99"] / 1000 for r in pts], "s--", color=color, alpha=0.6,
                    label=f"{method} p99")
        ax.set_title(f"{scenario} / {mode}")
        ax.set_xlabel("offered request rate (req/s)")
        ax.set_ylabel("job completion time (s)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    return {"latency_plot": _save(fig, "Latency vs request rate", out / "serve-latency.png")}


def plot_throughput(analyses: list[dict], out: Path) -> dict[str, Path]:
    """Request throughput each method sustains at the uncompressed stack's p99 JCT, per mode."""
    if not analyses:
        return {}
    fig, axes = plt.subplots(1, len(analyses), figsize=(6 * len(analyses), 4.2), squeeze=False)
    for ax, a in zip(axes[0], analyses):
        names = sorted(a["throughput_at_equal_p99"], key=method_rank)
        values = [a["throughput_at_equal_p99"][n] for n in names]
        bars = ax.bar(names, values, color=[_color(n) for n in names])
        for bar, name in zip(bars, names):
            ratio = a["throughput_ratio"].get(name)
            if ratio is not None:
                ax.annotate(f"{ratio:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=8)
        ax.set_title(f"memory / {a['mode']}: at p99 JCT <= {a['p99_bar_ms'] / 1000:.1f} s")
        ax.set_ylabel("request throughput (req/s)")
        ax.tick_params(axis="x", labelrotation=20)
        ax.grid(axis="y", alpha=0.3)
    return {"throughput_plot": _save(fig, "Throughput at equal p99 latency (the uncompressed p99 at its saturation "
                                          "rate)", out / "serve-throughput.png")}


def plot_network(rows: list[dict], out: Path) -> dict[str, Path]:
    """Mean JCT and mean TTFT per method for each shaped link rate."""
    shaped = [r for r in rows if r.get("link_mbit") is not None]
    if not shaped:
        return {}
    links = sorted({r["link_mbit"] for r in shaped}, reverse=True)
    methods = _methods(shaped)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    width = 0.8 / len(methods)
    for ax, (key, label) in zip(axes, (("e2e", "mean JCT (s)"), ("ttft", "mean TTFT (s)"))):
        for i, method in enumerate(methods):
            vals = []
            for link in links:
                pts = [r for r in shaped if r["method"] == method and r["link_mbit"] == link]
                vals.append(sum(p["summary"][key]["mean"] for p in pts) / len(pts) / 1000 if pts else 0.0)
            ax.bar([j + i * width for j in range(len(links))], vals, width, label=method, color=_color(method))
        ax.set_xticks([j + width * (len(methods) - 1) / 2 for j in range(len(links))])
        ax.set_xticklabels([f"{link:g} Mbit/s" for link in links])
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    return {"network_plot": _save(fig, "Network-constrained: prefill -> decode link shaped with tc tbf",
                                  out / "serve-network.png")}
