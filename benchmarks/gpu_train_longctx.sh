#!/usr/bin/env bash
# The prepared GPU training run (one lent H100/H200, one call, under 10 minutes): the long-context model of
# docs/data.md (`zeroc train --recipe longctx`: ~47M parameters, GQA 12:4, head_dim 64, 4,096 positions, a
# quarter synthetic long-range sequences, the repeat kind drawn twice as often as each other kind (its spans of
# uniform random tokens are the densest induction signal), answer tokens weighted 5x, lengths 512 -> 1,024 ->
# 4,096), then its
# passkey accuracy with `zeroc eval longctx`.
#   Prepare here (apt works here, not there):  tools/fetch_train_corpus.sh .corpus
#   Run there:  run(command="bash benchmarks/gpu_train_longctx.sh", carry=[".corpus"], timeout_s=600)
# The model, its training.json, held-out text and the passkey report come back under $OUT.
set -u
OUT=${OUT:-/tmp/zeroc-gpu}
MINUTES=${MINUTES:-6}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ ! -d .corpus/usr/share/doc/python3.11/html/_sources ]; then
    echo "no .corpus/: run tools/fetch_train_corpus.sh .corpus first and carry it"; exit 2
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || echo "editable install failed"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
start=$(date +%s)
timeout $(( ${MINUTES%.*} * 60 + 120 )) python3 -m zeroc.cli train --recipe longctx --corpus-root .corpus \
    --answer-weight 5 --kind-weights repeat=2 --curriculum 0:512,0.3:1024,0.6:4096 \
    --device cuda --minutes "$MINUTES" --out "$OUT/zeroc-longctx" --data-dir "$OUT/data" > "$OUT/train.txt" 2>&1
echo "== train rc=$? $(( $(date +%s) - start )) s"; tail -c 600 "$OUT/train.txt"; echo
start=$(date +%s)
timeout 110 python3 -m zeroc.cli eval longctx --model "$OUT/zeroc-longctx" --data "$OUT/data/heldout.txt" \
    --tasks passkey multikey --contexts 2048 4096 --samples 5 --budgets 1.0 --methods \
    --out-dir "$OUT/longctx" > "$OUT/longctx.txt" 2>&1
echo "== passkey rc=$? $(( $(date +%s) - start )) s"; cat "$OUT/longctx.txt"
ls -la "$OUT/zeroc-longctx"
