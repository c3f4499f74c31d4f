#!/usr/bin/env bash
# On the GPU machine: the top-k middle attention study of the passkey task in one command.
#
#   bash scripts/gpu_passkey.sh [MODEL]        # MODEL: a .gguf file or HF directory (default model if omitted)
#   PHASES="32k ppl" bash scripts/gpu_passkey.sh MODEL   # a subset of: 16k 32k ppl
#
# Phases (each with a time limit, JSON written after every prompt so a cut-off run keeps its
# data): the 16K sweep over top-k settings, 32K for the main settings, then perplexity at 16K
# for pure LM-Infinite against LM-Infinite with top-k on every row. Logs and JSON go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
MODEL=(${1:+--model "$1"})
SAMPLES="${SAMPLES:-20}"
PHASES=" ${PHASES:-16k 32k ppl} "
export PYTHONUNBUFFERED=1

"$PY" -c "import lm_infinite" 2>/dev/null ||
  MAX_JOBS=16 "$PY" -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 ||
  { tail -30 "$OUT/build.log"; exit 1; }

[[ $PHASES == *" 16k "* ]] && timeout "${LIMIT_16K:-300}" "$PY" bench/passkey_top_k.py "${MODEL[@]}" --lengths 16384 --samples "$SAMPLES" \
  --device cuda --dtype bfloat16 --k 5 20 50 --first-layers 0 4 --distances 2048 4096 --rows 1 16 64 256 \
  --out "$OUT" >"$OUT/passkey_16k.log" 2>&1
[[ $PHASES == *" 32k "* ]] && timeout "${LIMIT_32K:-180}" "$PY" bench/passkey_top_k.py "${MODEL[@]}" --lengths 32768 --samples "$SAMPLES" \
  --device cuda --dtype bfloat16 --k 5 20 --first-layers 0 4 --distances 2048 4096 --rows 1 64 \
  --out "$OUT" >"$OUT/passkey_32k.log" 2>&1
[[ $PHASES == *" ppl "* ]] && timeout "${LIMIT_PPL:-90}" "$PY" -m lm_infinite.cli ppl "${MODEL[@]}" --tokens 16384 --device cuda \
  --dtype bfloat16 --methods lm-infinite,lm-infinite+top-k --top-k 20 --top-k-first-layer 0 \
  --top-k-distance 4096 --top-k-rows all --no-progress --json "$OUT/ppl_top_k.json" >"$OUT/ppl.log" 2>&1

for log in passkey_16k passkey_32k ppl; do
  [ -f "$OUT/$log.log" ] || continue
  echo "== $log"
  tail -4 "$OUT/$log.log" | grep -v "^|"
done
"$PY" - "$OUT" <<'EOF'
import json, pathlib, sys
from collections import defaultdict
out = pathlib.Path(sys.argv[1])
for path in sorted(out.glob("passkey_top_k_*.json")):
    records = json.loads(path.read_text())["records"]
    hits = defaultdict(list)
    for r in records:
        hits[(r["method"], r.get("distance_cap"), r.get("top_k"), r.get("first_layer"), r.get("distance"),
              r.get("rows"))].append(r["correct"])
    print(f"== {path.name}: method cap k layer dist rows -> correct/n")
    for key, values in hits.items():
        print(" ".join("-" if x is None else str(x) for x in key), f"{sum(values)}/{len(values)}")
EOF
