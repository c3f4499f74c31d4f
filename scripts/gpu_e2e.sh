#!/usr/bin/env bash
# On the GPU machine: the decode-step tests and the end-to-end benchmark, in one call.
#
#   bash scripts/gpu_e2e.sh                 # build, tests, e2e (about 8 minutes)
#   bash scripts/gpu_e2e.sh test e2e        # a subset: build test e2e
#
# Logs go to $OUT (default ./out): build.log, pytest_decode.log (the decode step's CUDA-graph
# test, the HF CUDA tests, SmolLM2 greedy tokens on CUDA against the CPU), e2e.log and
# e2e.json / e2e.png. The benchmark's table is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
PHASES="${*:-build test e2e}"
export MAX_JOBS="${MAX_JOBS:-16}"
PY="${PYTHON:-python3}"
SUMMARY=()

run() {
  local name="$1" limit="$2" log="$3"
  shift 3
  local start=$SECONDS
  timeout "$limit" "$@" >"$log" 2>&1
  local rc=$?
  local status="ok"
  [ $rc -eq 124 ] && status="TIMEOUT(${limit}s)"
  [ $rc -ne 0 ] && [ $rc -ne 124 ] && status="FAILED(rc=$rc)"
  SUMMARY+=("$(printf '%-12s %-14s %5ss  %s' "$name" "$status" "$((SECONDS - start))" "$(basename "$log")")")
  return $rc
}
want() { [[ " $PHASES " == *" $1 "* ]]; }

want build && run build 200 "$OUT/build.log" "$PY" -m pip install --no-build-isolation --no-deps -e .
want test && run test 120 "$OUT/pytest_decode.log" "$PY" -m pytest -q -rs tests/test_decode_step.py \
  tests/test_hf_cuda.py -k "cuda or CUDA"
want e2e && run e2e 330 "$OUT/e2e.log" "$PY" bench/e2e.py --json "$OUT/e2e.json" --plot "$OUT/e2e.png"

printf '%s\n' "${SUMMARY[@]}"
[ -f "$OUT/e2e.log" ] && sed -n '/^model /,$p' "$OUT/e2e.log" | tail -40
