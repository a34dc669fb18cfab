"""`zeroc bench transfer` moves the same bytes every way and reports positive rates."""

from __future__ import annotations

import json
import subprocess
import sys


def zeroc(*args: str) -> subprocess.CompletedProcess:
    # Generous: three processes import torch, and the test machine may be shared.
    return subprocess.run([sys.executable, "-m", "zeroc.cli", *args], capture_output=True, text=True, timeout=900)


def test_bench_transfer_json():
    out = zeroc("bench", "transfer", "--json", "--tokens", "64", "--layers", "2", "--kv-heads", "2",
                "--head-dim", "64", "--chunk-bytes", "4096", "--rounds", "2", "--repeats", "3")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["payload_bytes"] == 64 * 2 * 2 * 2 * 64 * 2  # tokens x layers x (K, V) x heads x dim x bf16
    assert report["kv_bytes_per_prompt_token"]["uncompressed"] == 2 * 2 * 2 * 64 * 2
    assert report["grpc_bytes_per_s"] > 0 and report["raw_tcp_bytes_per_s"] > 0
    assert report["grpc_over_raw"] == report["grpc_bytes_per_s"] / report["raw_tcp_bytes_per_s"]
    assert len(report["samples"]) == 3 and report["bare_grpc_bytes_per_s"] > 0
    ratios = sorted(s["grpc"]["bytes_per_s"] / s["raw_tcp"]["bytes_per_s"] for s in report["samples"])
    assert report["median_grpc_over_raw"] == ratios[1]
    assert all(v > 0 for v in report["median_cpu_s_per_gib"].values())
    assert set(report["median_cpu_ratio_vs_raw"]) == {"grpc", "grpc_mac", "bare_grpc"}
    # the MACed path moved the same bytes (checked by the bench), its chunks verified by the receiver
    assert report["grpc_mac_bytes_per_s"] > 0 and report["median_grpc_mac_over_grpc"] > 0


def test_bench_transfer_rejects_bad_sizes():
    out = zeroc("bench", "transfer", "--tokens", "0")
    assert out.returncode == 2 and "--tokens" in out.stderr
    out = zeroc("bench", "transfer", "--repeats", "0")
    assert out.returncode == 2 and "--repeats" in out.stderr
