#!/usr/bin/env bash
# The prepared GPU run (one lent H100/H200): the attention kernels against SDPA and the copy rate, the Engine
# against its bandwidth floor, and the whole service stack on CUDA. Each part is time-boxed; results go to $OUT.
#   bash benchmarks/gpu_all.sh [kernels] [engine] [runtime] [serve] [gateway]   (default: the first four, in order;
#   each part is time-boxed: 260 + 365 + 240 + 200 s at most). One call may run 600 s: on the H100 (2026-12-05)
#   kernels took 181 s, engine 136, runtime over 150 and serve 100, so split them over two calls, e.g.
#   `kernels runtime` then `engine serve`.
# `runtime` is benchmarks/gpu_engine.py: CUDA graphs, one sync per step, seeded sampling, isolation and async
# scheduling checked on the device, the triton backend's tokens against the references, and a token tier's and
# the int8 store's decode steps in CUDA graphs against eager ones (pass/fail lines).
# `gateway` runs the OpenAI gateway against gRPC on the device machine's 16 CPU cores (the model on the CPU),
# where the gateway has cores of its own: what the 2-vCPU development VM cannot resolve.
# Wheels the device image lacks travel in .whl/: fetch them first with `bash benchmarks/gpu_wheels.sh`.
set -u
OUT=${OUT:-/tmp/zeroc-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton-cache}
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || echo "editable install failed (see install.log)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
parts=${*:-kernels engine runtime serve}
for part in $parts; do
    start=$(date +%s)
    case $part in
        kernels) timeout 260 python3 benchmarks/gpu_kernels.py --json "$OUT/gpu_kernels.json" > "$OUT/gpu_kernels.txt" 2>&1
                 echo "== kernels rc=$? $(( $(date +%s) - start )) s"; tail -70 "$OUT/gpu_kernels.txt" ;;
        engine)  timeout 200 python3 -m zeroc.cli bench engine --device cuda --shape llama3-8b --layers 16 --batch 64 \
                     --prompt 2048 --new 64 --methods none zeroc-fold-64 zeroc-rotate-64 --schedulers sync async --rounds 3 \
                     > "$OUT/engine.txt" 2>&1
                 echo "== engine rc=$? $(( $(date +%s) - start )) s"; tail -40 "$OUT/engine.txt"
                 # ZeroC with a token tier (4 sinks, 64 recent tokens at full rank), apart so it cannot cost the table
                 # above; each method's decode step profiled, kernel by kernel (the tier's step ran 1.44x uncompressed)
                 timeout 90 python3 -m zeroc.cli bench engine --device cuda --shape llama3-8b --layers 16 --batch 64 \
                     --prompt 2048 --new 64 --methods none zeroc-fold-64 zeroc-fold-64-tier-4-64 --rounds 1 --profile \
                     > "$OUT/engine_tier.txt" 2>&1
                 echo "== engine tier rc=$? $(( $(date +%s) - start )) s"; tail -62 "$OUT/engine_tier.txt"
                 # Sampled requests (temperature 0.8, top-p 0.9: a full sort of the vocabulary a step on a device),
                 # against the greedy rows above; gpu_kernels.py's sampling section times the sampler alone
                 timeout 75 python3 -m zeroc.cli bench engine --device cuda --shape llama3-8b --layers 16 --batch 64 \
                     --prompt 2048 --new 64 --methods none --schedulers sync async --rounds 1 --temperature 0.8 \
                     --top-p 0.9 > "$OUT/engine_sampled.txt" 2>&1
                 echo "== engine sampled rc=$? $(( $(date +%s) - start )) s"; tail -12 "$OUT/engine_sampled.txt" ;;
        serve)   timeout 200 python3 benchmarks/gpu_serve.py --dtype bfloat16 > "$OUT/gpu_serve.txt" 2>&1
                 echo "== serve rc=$? $(( $(date +%s) - start )) s"; tail -40 "$OUT/gpu_serve.txt" ;;
        runtime) timeout 240 python3 benchmarks/gpu_engine.py --device cuda > "$OUT/gpu_engine.txt" 2>&1
                 echo "== runtime rc=$? $(( $(date +%s) - start )) s"; tail -12 "$OUT/gpu_engine.txt" ;;
        gateway) timeout 240 python3 -m zeroc.cli bench gateway --requests 64 --rounds 8 --pairs 40 --json \
                     > "$OUT/gateway.json" 2> "$OUT/gateway.txt"
                 echo "== gateway rc=$? $(( $(date +%s) - start )) s"; tail -12 "$OUT/gateway.txt"
                 python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print({k: d[k] for k in ('throughput_ratio', 'ttft_p50_delta_ms', 'unloaded_ttft_delta_ms')}, d['backends'])" "$OUT/gateway.json" ;;
    esac
done
