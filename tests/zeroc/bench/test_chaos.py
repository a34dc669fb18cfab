"""The small version of `zeroc bench chaos`: real processes, two faults, a short fuzz."""

from __future__ import annotations

import argparse

from zeroc.bench import chaos as bench_chaos


def test_kill_9_of_the_decode_service_and_a_prefill_outage_leave_nothing_hung_or_leaked(capsys):
    args = argparse.Namespace(scenarios=["kill-decode", "prefill-outage"], duration=8.0, clients=2, timeout=20.0,
                              fuzz=150)
    assert bench_chaos.run(args) == 0  # non-zero on a hung request, a leak, or UNKNOWN/INTERNAL from fuzzing
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line.split("|")[2:] for line in out.splitlines()
            if line.startswith("| ") and not line.startswith("| scenario")}
    assert set(rows) == {"kill-decode", "prefill-outage"}
    assert int(rows["prefill-outage"][0]) > 0 and rows["prefill-outage"][1].strip() == "0"  # all OK: local prefill
    assert int(rows["kill-decode"][0]) > 0  # traffic resumed after the restart
    assert "INTERNAL" not in out and "UNKNOWN" not in out
