"""The quality table as text, markdown and a plot, plus the checks of its two quality goals: within +1% of
uncompressed at budget 0.5, and ahead of every baseline at equal bytes."""

from __future__ import annotations

from pathlib import Path

from zeroc.eval.paired import TIE_SE, PairedDiff, paired_difference
from zeroc.eval.quality import UNCOMPRESSED, ZEROC, QualityRow

PROTOCOLS = {"streaming": ("stream_nll", "stream_tokens"), "prefill": ("prefill_nll", "prefill_tokens")}

NOTES_FILE = "quality-notes.md"  # hand-written analysis next to the report, included verbatim


def _methods(rows: list[QualityRow]) -> list[str]:
    return list(dict.fromkeys(r.method for r in rows))


def _zeroc(rows: list[QualityRow]) -> list[str]:
    return [m for m in _methods(rows) if m.startswith(ZEROC)]


def _full_pass(rows: list[QualityRow]) -> list[str]:
    """Methods with a full-pass value at some budget (uncompressed, fp16 ZeroC)."""
    return [m for m in _methods(rows) if any(r.full_ppl is not None for r in rows if r.method == m)]


def _budgets(rows: list[QualityRow]) -> list[float]:
    return sorted({r.budget for r in rows}, reverse=True)


def _cell(rows: list[QualityRow], method: str, budget: float, attr: str, fmt: str) -> str:
    for r in rows:
        if r.method == method and r.budget == budget:
            value = getattr(r, attr)
            return "n/a" if value is None else format(value, fmt)
    return ""


def _table(rows: list[QualityRow], attr: str, fmt: str, methods: list[str] | None = None) -> list[str]:
    budgets = _budgets(rows)
    lines = ["| method | " + " | ".join(f"b={b:g}" for b in budgets) + " |",
             "|---|" + "---|" * len(budgets)]
    for m in methods or _methods(rows):
        lines.append(f"| {m} | " + " | ".join(_cell(rows, m, b, attr, fmt) for b in budgets) + " |")
    return lines


def _row_at(rows: list[QualityRow], method: str, budget: float) -> QualityRow | None:
    return next((r for r in rows if r.method == method and r.budget == budget), None)


def paired(rows: list[QualityRow], method: str, other: str, budget: float, protocol: str) -> PairedDiff | None:
    """`method` against `other` at `budget` under `protocol`, window by window (None: either did not run)."""
    nll, tokens = PROTOCOLS[protocol]
    a, b = _row_at(rows, method, budget), _row_at(rows, other, budget)
    if a is None or b is None or not getattr(a, nll) or len(getattr(a, nll)) != len(getattr(b, nll)):
        return None
    return paired_difference(getattr(a, nll), getattr(b, nll), getattr(a, tokens))


def diff_table(rows: list[QualityRow], protocol: str) -> list[str]:
    """Paired perplexity change vs uncompressed ± its standard error, per method and budget."""
    budgets = _budgets(rows)
    lines = ["| method | " + " | ".join(f"b={b:g}" for b in budgets) + " |", "|---|" + "---|" * len(budgets)]
    for m in _methods(rows):
        if m == UNCOMPRESSED:
            continue
        cells = [paired(rows, m, UNCOMPRESSED, b, protocol) for b in budgets]
        lines.append(f"| {m} | " + " | ".join("n/a" if d is None else d.describe() for d in cells) + " |")
    return lines


def paired_checks(rows: list[QualityRow]) -> list[str]:
    """Per protocol and budget < 1: each ZeroC row against every baseline, as statistical statements."""
    out = []
    for protocol in PROTOCOLS:
        for b in [b for b in _budgets(rows) if b < 1.0]:
            for name in _zeroc(rows):
                ahead, level, behind = [], [], []
                for m in _methods(rows):
                    if m in (*_zeroc(rows), UNCOMPRESSED):
                        continue
                    d = paired(rows, name, m, b, protocol)
                    if d is not None:
                        (level if d.tie else ahead if d.mean < 0 else behind).append(f"{m} {d.describe()}")
                if ahead or level or behind:
                    out.append(f"- {protocol}, b={b:g}: {name} is ahead of {len(ahead)}, level with {len(level)}, "
                               f"behind {len(behind)} baseline(s)."
                               + "".join(f" {k}: {', '.join(v)}." for k, v in
                                         (("Ahead of", ahead), ("Level with", level), ("Behind", behind)) if v))
    return out


def text_table(rows: list[QualityRow]) -> str:
    return "\n".join(["streaming perplexity (full-pass in the second table):",
                      *_table(rows, "streaming_ppl", ".3f"), "", "full-pass perplexity:",
                      *_table(rows, "full_ppl", ".3f", _full_pass(rows))])


def _ppl(rows: list[QualityRow], method: str, budget: float) -> float | None:
    return next((r.streaming_ppl for r in rows if r.method == method and r.budget == budget), None)


def goal_checks(rows: list[QualityRow]) -> list[str]:
    """The two quality goals, stated from the numbers (streaming perplexity), for every ZeroC mode."""
    out = []
    zeroc, base = _zeroc(rows), _ppl(rows, UNCOMPRESSED, 0.5)
    for name in zeroc:
        z = _ppl(rows, name, 0.5)
        if base is not None and z is not None:
            rel = 100 * (z / base - 1)
            out.append(f"- {name} at budget 0.5: {z:.3f} vs uncompressed {base:.3f} ({rel:+.2f}%): "
                       f"{'within' if rel <= 1.0 else 'NOT within'} the +1% goal.")
    for b in [b for b in _budgets(rows) if 0.375 <= b < 1.0]:
        for name in zeroc:
            zb = _ppl(rows, name, b)
            if zb is None:
                continue
            wins, losses = [], []
            for m in _methods(rows):
                other = _ppl(rows, m, b)
                if m in (*zeroc, UNCOMPRESSED) or other is None:
                    continue
                rel = 100 * (zb / other - 1)
                (wins if zb < other else losses).append(f"{m} {other:.3f} ({rel:+.2f}%)")
            verdict = "beats every baseline" if not losses else f"does NOT beat {len(losses)} baseline(s)"
            out.append(f"- Budget {b:g}: {name} {zb:.3f} {verdict}."
                       + (f" Lower than: {', '.join(wins)}." if wins else "")
                       + (f" Not lower than: {', '.join(losses)}." if losses else ""))
    return out


def markdown(rows: list[QualityRow], meta: dict[str, str], notes: str | None) -> str:
    lines = ["# KV-cache quality: ZeroC vs baselines at equal KV bytes", "",
             "Generated by `zeroc eval quality` (do not edit by hand; the analysis section is "
             f"`docs/{NOTES_FILE}`, included verbatim).", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    lines += ["", "Budget b = KV bytes as a fraction of the uncompressed fp16 cache, at every position "
              "(definitions in docs/policies.md). At b=1 every method but the int8 rows is the identity (each policy "
              "is tested to reproduce the uncompressed streaming perplexity there), so b=1 repeats the uncompressed "
              "value. An int8 row quantises at every budget: its bytes follow from its bits (codes + one fp32 scale "
              "per token and KV head) and ZeroC's ranks, chosen as the largest whose int8 cache fits b; the bytes "
              "tables show what it really holds.",
              "", "## Streaming perplexity (token by token, lower is better)", "",
              *_table(rows, "streaming_ppl", ".3f"), "",
              "## Prefill-then-score perplexity (prefill, compress, score the continuation teacher-forced)", "",
              *_table(rows, "prefill_ppl", ".3f"), "",
              "## Paired differences vs uncompressed (perplexity change ± standard error over windows)", "",
              f"A difference within {TIE_SE:g} standard errors of zero is reported as a tie. Streaming:", "",
              *diff_table(rows, "streaming"), "", "Prefill-then-score:", "", *diff_table(rows, "prefill"), "",
              "## Full-pass perplexity (methods with a full-pass form)", "",
              *_table(rows, "full_ppl", ".3f", _full_pass(rows)), "",
              "## KV bytes actually held (fraction of fp16; mean over all scored positions)", "",
              *_table(rows, "kv_fraction", ".3f"), "",
              "Largest fraction at any position >= 128 (early positions are dominated by floors: sinks, "
              "at least one token, KIVI's key residual):", "",
              *_table(rows, "kv_fraction_max", ".3f"), "",
              "## Quality goals", "", *goal_checks(rows), "",
              "ZeroC against each baseline, window by window (differences are ZeroC's perplexity change ± "
              "standard error):", "", *paired_checks(rows), "",
              "![streaming perplexity vs KV budget](quality.png)", ""]
    notes_lines = [n for n in (r.note for r in rows if r.note and r.note != "identity at 1.0")]
    if notes_lines:
        lines += ["Unreachable budgets:", "", *[f"- {n}" for n in dict.fromkeys(notes_lines)], ""]
    if notes:
        lines += ["## Analysis", "", notes.strip(), ""]
    return "\n".join(lines)


def plot(rows: list[QualityRow], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display; also keeps tests headless
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    base = _ppl(rows, UNCOMPRESSED, max(_budgets(rows)))
    for ax, zoom in zip(axes, (False, True)):
        for m in _methods(rows):
            pts = sorted((r.budget, r.streaming_ppl) for r in rows if r.method == m and r.streaming_ppl is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                        linewidth=2.5 if m.startswith(ZEROC) else 1.2, linestyle="--" if m == UNCOMPRESSED else "-",
                        label=m)
        ax.set_xlabel("KV budget (fraction of the fp16 cache)")
        ax.set_ylabel("streaming perplexity")
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
        if zoom and base is not None:  # the near-lossless methods differ by tenths of a percent
            ax.set_ylim(base * 0.997, base * 1.01)
            ax.set_title("zoom: up to +1% of uncompressed")
        else:
            ax.set_title(title)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(rows: list[QualityRow], out_dir: Path, meta: dict[str, str]) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    notes_file = out_dir / NOTES_FILE
    notes = notes_file.read_text() if notes_file.is_file() else None
    md, png = out_dir / "quality.md", out_dir / "quality.png"
    md.write_text(markdown(rows, meta, notes))
    plot(rows, png, f"{meta.get('model', '')}: streaming perplexity vs KV budget")
    return md, png
