"""Generate the Python stubs of protos/zeroc/v1 into zeroc/v1 (or --out DIR, for the staleness test).

The stubs are committed so that `pip install` needs no code generation step; `make protos`
regenerates them and tests/protos/test_stubs_fresh.py fails when they are out of date.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PACKAGE_DIR = Path("zeroc") / "v1"


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))


def generate(out_root: Path) -> list[Path]:
    """Write *_pb2.py, *_pb2.pyi and *_pb2_grpc.py under out_root/zeroc/v1; return their paths."""
    from grpc_tools import protoc

    (out_root / PACKAGE_DIR).mkdir(parents=True, exist_ok=True)
    rel = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    args = ["protoc", f"-I{PROTO_ROOT}", f"--python_out={out_root}", f"--pyi_out={out_root}",
            f"--grpc_python_out={out_root}", *rel]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted(p for p in (out_root / PACKAGE_DIR).iterdir() if p.name.endswith((".py", ".pyi"))
                  and "_pb2" in p.name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(ROOT), help="root to write zeroc/v1/... under")
    args = parser.parse_args()
    for path in generate(Path(args.out)):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
