"""The zeroc.v1 protocol: buf lint passes and the committed stubs match what protoc generates now."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_stubs_are_fresh(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "gen_protos.py"), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    fresh = sorted((tmp_path / "zeroc" / "v1").iterdir())
    assert {p.name for p in fresh} >= {"generation_pb2.py", "generation_pb2_grpc.py", "prefill_pb2.py",
                                        "prefill_pb2_grpc.py", "kv_store_pb2.py", "kv_store_pb2_grpc.py"}
    for path in fresh:
        committed = ROOT / "zeroc" / "v1" / path.name
        assert committed.is_file(), f"{committed} is missing; run `make protos`"
        assert committed.read_text() == path.read_text(), f"{committed} is stale; run `make protos`"


def test_buf_lint_passes():
    buf = Path(sys.executable).parent / "buf"
    out = subprocess.run([str(buf), "lint"], cwd=ROOT / "protos", capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_protocol_package_is_versioned():
    from zeroc.v1 import generation_pb2, kv_store_pb2, prefill_pb2

    for module in (generation_pb2, prefill_pb2, kv_store_pb2):
        assert module.DESCRIPTOR.package == "zeroc.v1"
        for name in module.DESCRIPTOR.message_types_by_name:
            assert module.DESCRIPTOR.message_types_by_name[name].full_name.startswith("zeroc.v1.")
