#!/usr/bin/env bash
# The wheels a lent device machine lacks, fetched before the call: its image has torch and triton but not the
# project's gRPC, protobuf and redis clients, and it cannot reach PyPI. They land in .whl/ for the device's Python
# (3.12, manylinux x86_64) at the versions this checkout's .venv runs. .whl/ is left untracked and not ignored, so
# the device tool copies it with the working tree; benchmarks/gpu_all.sh installs it there. Do not commit it.
#   bash benchmarks/gpu_wheels.sh [python-version]      (default 3.12)
set -euo pipefail
cd "$(dirname "$0")/.."
python_version=${1:-3.12}
# the packages the services import that the device image does not have (google-crc32c: the KV stream's checksums)
pins=$(.venv/bin/pip freeze | grep -iE '^(grpcio|grpcio-health-checking|grpcio-reflection|protobuf|google-crc32c|redis)==')
[ "$(wc -l <<< "$pins")" -eq 6 ] || { echo "expected six pinned packages in .venv (make install first), got: $pins" >&2; exit 1; }
# shellcheck disable=SC2086  # one argument per pin
.venv/bin/pip download -q --only-binary=:all: --no-deps --python-version "$python_version" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    -d .whl $pins
ls .whl
