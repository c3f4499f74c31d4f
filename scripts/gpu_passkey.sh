#!/usr/bin/env bash
# On the GPU machine: the top-k middle attention study of the passkey task (docs/top_k_passkey.md, docs/benchmarks.md).
#
#   bash scripts/gpu_passkey.sh [MODEL]                   # MODEL: .gguf or HF directory (default model if omitted)
#   PHASES="main ppl" bash scripts/gpu_passkey.sh MODEL   # a subset of: sweep main ppl
#
# sweep: 48 top-k settings at 16K on 8 prompts (about 6 minutes on an H100);
# main:  stock, truncated, LM-Infinite and three top-k settings, 20 prompts at 16K and 32K (4-5 min);
# ppl:   perplexity at 16K, pure LM-Infinite against top-k on every row (1 min);
# paged: the retrieval preset's setting with the paged store, 20 prompts at 64K, and the middle
#        store's device memory and decode time by stream length, offloaded or not (4-5 min).
# JSON is written after every prompt, so a phase cut off by its time limit keeps its data.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
MODEL=(${1:+--model "$1"})
PHASES=" ${PHASES:-sweep main ppl paged} "
export PYTHONUNBUFFERED=1
GPU=(--device cuda --dtype bfloat16)

"$PY" -c "import lm_infinite" 2>/dev/null ||
  MAX_JOBS=16 "$PY" -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 ||
  { tail -30 "$OUT/build.log"; exit 1; }

if [[ $PHASES == *" sweep "* ]]; then
  mkdir -p "$OUT/sweep"
  timeout 420 "$PY" bench/passkey_top_k.py "${MODEL[@]}" "${GPU[@]}" --lengths 16384 --samples 8 \
    --k 5 20 50 --first-layers 0 4 --distances 2048 4096 --rows 1 16 64 256 --out "$OUT/sweep" \
    >"$OUT/sweep.log" 2>&1
  sed -n '/^| method/,$p' "$OUT/sweep.log"
fi
if [[ $PHASES == *" main "* ]]; then
  for length in 16384 32768; do
    timeout 240 "$PY" bench/passkey_top_k.py "${MODEL[@]}" "${GPU[@]}" --lengths $length --samples 20 \
      --k 5 --first-layers 4 --distances 4096 --rows 1 64 256 --out "$OUT" >"$OUT/main_$length.log" 2>&1
    sed -n '/^| method/,$p' "$OUT/main_$length.log"
  done
fi
if [[ $PHASES == *" ppl "* ]]; then
  timeout 120 "$PY" -m lm_infinite.apps.cli ppl "${MODEL[@]}" "${GPU[@]}" --tokens 16384 \
    --methods lm-infinite,lm-infinite+top-k --top-k 5 --top-k-first-layer 4 --top-k-distance 4096 \
    --top-k-rows all --no-progress --json "$OUT/ppl_top_k.json" >"$OUT/ppl.log" 2>&1
  tail -10 "$OUT/ppl.log"
fi
if [[ $PHASES == *" paged "* ]]; then
  timeout 240 "$PY" bench/passkey_top_k.py "${MODEL[@]}" "${GPU[@]}" --lengths 65536 --samples 20 \
    --k 5 --first-layers 4 --distances 4096 --distance-caps 2048 --rows 64 --store paged \
    --no-stock --no-truncated --out "$OUT" >"$OUT/paged_65536.log" 2>&1
  sed -n '/^| method/,$p' "$OUT/paged_65536.log"
  timeout 120 "$PY" bench/middle_store_decode.py --device cuda --lengths 16384 65536 262144 \
    --json "$OUT/middle_store_decode_cuda.json" >"$OUT/middle_store_decode.log" 2>&1
  tail -12 "$OUT/middle_store_decode.log"
fi
