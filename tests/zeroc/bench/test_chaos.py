"""The small version of `zeroc bench chaos`: real processes (a prefill service, two decode replicas, Redis),
kill -9 of one decode replica and SIGTERM of the other under load, a short fuzz."""

from __future__ import annotations

import argparse

from zeroc.bench import chaos as bench_chaos


def test_killing_or_terminating_a_decode_replica_fails_only_calls_in_flight_on_it(capsys):
    args = argparse.Namespace(scenarios=["kill-decode-0", "term-decode-1"], duration=5.0, clients=3, timeout=20.0,
                              fuzz=150)
    # Non-zero on a failure not in flight on the faulted replica, a hung request, a leak, or UNKNOWN/INTERNAL
    # from fuzzing.
    assert bench_chaos.run(args) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in out.splitlines()
            if line.startswith("| ") and not line.startswith("| scenario")}
    assert set(rows) == {"kill-decode-0", "term-decode-1"}
    for name, (ok, failed, in_flight, not_in_flight, hung, *_rest) in rows.items():
        assert int(ok) > 0, name
        assert not_in_flight == "0" and hung == "0", (name, rows[name])
        total = sum(int(part.rsplit(" ", 1)[1]) for part in failed.split(", ")) if failed != "0" else 0
        assert total == int(in_flight), (name, rows[name])  # every failure was in flight on the faulted replica
    # SIGTERM drains: the calls running on the terminated replica finish, and new calls go to the other.
    assert rows["term-decode-1"][1] == "0", rows["term-decode-1"]
    assert "INTERNAL" not in out and "UNKNOWN" not in out
