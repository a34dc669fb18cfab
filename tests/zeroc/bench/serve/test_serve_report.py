"""The goal analysis (saturation rate, JCT cut, throughput at equal p99) on hand-made rows, and the
report files it writes."""

from __future__ import annotations

import json

import pytest

from zeroc.bench.serve.report import analyse_mode, saturation_rate, throughput_at_p99, write_report
from zeroc.bench.serve.scenarios import Results


def _row(method, rate, mean_ms, p99_ms, thr, mode="disaggregated"):
    return {"scenario": "memory", "workload": "long", "mode": mode, "method": method, "rate": rate,
            "link_mbit": None, "summary": {"e2e": {"mean": mean_ms, "median": mean_ms, "p90": p99_ms, "p99": p99_ms},
                                           "request_throughput": thr}}


ROWS = [
    _row("none", 0.1, 1000, 1500, 0.10), _row("none", 0.2, 1500, 3000, 0.19), _row("none", 0.4, 4000, 8000, 0.25),
    _row("zeroc-0.5", 0.1, 900, 1200, 0.10), _row("zeroc-0.5", 0.2, 1000, 1600, 0.20),
    _row("zeroc-0.5", 0.4, 2000, 4000, 0.38),
    _row("h2o-0.5", 0.1, 950, 1400, 0.10), _row("h2o-0.5", 0.2, 1300, 2500, 0.19),
    _row("h2o-0.5", 0.4, 2600, 9000, 0.30),
]


def test_saturation_is_where_the_uncompressed_mean_jct_doubles():
    base = [r for r in ROWS if r["method"] == "none"]
    assert saturation_rate(base) == (0.4, True)  # 4000 >= 2 * 1000; 1500 is not
    flat = [_row("none", r, 1000 + r, 2000, r) for r in (0.1, 0.2)]
    assert saturation_rate(flat) == (0.2, False)  # never doubled: the highest rate, flagged
    # Against a lone request's JCT (the automatic-rate probe), the lowest rate may already be saturated.
    assert saturation_rate(base, unloaded_ms=400) == (0.1, True)
    assert saturation_rate(base, unloaded_ms=1000) == (0.4, True)


def test_throughput_at_a_p99_bar_interpolates_between_rates():
    z = [r for r in ROWS if r["method"] == "zeroc-0.5"]
    assert throughput_at_p99(z, 4000) == pytest.approx(0.38)  # reached exactly at 0.4
    # Bar 2800 ms lies between p99 1600 (0.20 req/s) and 4000 (0.38): 0.20 + (1200 / 2400) * 0.18.
    assert throughput_at_p99(z, 2800) == pytest.approx(0.29)
    assert throughput_at_p99(z, 1000) == 0.0  # above the bar at every rate


def test_goals_of_one_mode():
    a = analyse_mode(ROWS, "disaggregated")
    assert a["saturation_rate"] == 0.4 and a["p99_bar_ms"] == 8000
    assert a["jct_cut"] == pytest.approx(1 - 2000 / 4000)
    assert a["throughput_at_equal_p99"]["none"] == pytest.approx(0.25)
    assert a["throughput_at_equal_p99"]["zeroc-0.5"] == pytest.approx(0.38)  # p99 stays under 8000
    # h2o: 2500 ms at 0.19, 9000 ms at 0.30: 0.19 + (5500 / 6500) * 0.11.
    assert a["throughput_at_equal_p99"]["h2o-0.5"] == pytest.approx(0.19 + 5500 / 6500 * 0.11)
    assert a["throughput_ratio"]["zeroc-0.5"] == pytest.approx(0.38 / 0.25)
    assert a["equal_bytes"] == [{"zeroc": "zeroc-0.5", "baseline": "h2o-0.5", "zeroc_jct_ms": 2000,
                                 "baseline_jct_ms": 2600}]
    assert analyse_mode(ROWS, "colocated") is None
    early = analyse_mode(ROWS, "disaggregated", unloaded_ms=700)  # 1500 >= 2 * 700: saturated at 0.2
    assert (early["saturation_rate"], early["p99_bar_ms"]) == (0.2, 3000)
    assert early["jct_cut"] == pytest.approx(1 - 1000 / 1500)


def test_report_files(tmp_path):
    results = Results(rows=[{**r, "summary": _full(r["summary"])} for r in ROWS],
                      skipped=[{"scenario": "memory", "mode": "disaggregated", "method": "kivi-4",
                                "reason": "`zeroc serve` has no --kv-policy"}],
                      topology={"memory": "loopback, unshaped"})
    paths = write_report(results, {"date": "2026-11-29"}, tmp_path)
    md = paths["markdown"].read_text()
    assert "mean JCT 50.0% lower (2000 vs 4000 ms)" in md
    assert "1.52x" in md and "kivi-4" in md and "**met**" in md
    assert json.loads(paths["json"].read_text())["goals"][0]["saturation_rate"] == 0.4
    for key in ("latency_plot", "throughput_plot"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "network_plot" not in paths  # no shaped rows


def _full(summary):
    dist = {"mean": 1.0, "median": 1.0, "p90": 1.0, "p99": 1.0}
    return {"completed": 4, "failed": 0, "output_throughput": 1.0, "goodput": summary["request_throughput"],
            "ttft": dist, "tpot": dist, "itl": dist, "queue": dist, "kv_bytes_per_request": 0.0,
            "prefix_hit_rate": 0.0, "preemptions": 0, **summary}


def test_report_renders_again_from_its_json(tmp_path, capsys):
    from zeroc.cli import main

    results = Results(rows=[{**r, "summary": _full(r["summary"])} for r in ROWS], topology={"memory": "loopback"})
    first = write_report(results, {"date": "2026-11-29"}, tmp_path / "a")
    assert main(["bench", "serve", "--from-json", str(first["json"]), "--out", str(tmp_path / "b"), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["goals"][0]["saturation_rate"] == 0.4
    assert (tmp_path / "b" / "serve.md").read_text() == first["markdown"].read_text()
    (tmp_path / "junk.json").write_text("{}")
    assert main(["bench", "serve", "--from-json", str(tmp_path / "junk.json")]) == 2
    assert "not a serve.json" in capsys.readouterr().err
