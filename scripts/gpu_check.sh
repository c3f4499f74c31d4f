#!/usr/bin/env bash
# On the GPU machine: build, test, sanitize and benchmark the CUDA kernels in one command.
#
#   bash scripts/gpu_check.sh                      # every phase (about 10 minutes)
#   bash scripts/gpu_check.sh build test           # a subset: build test sanitize bench
#
# Logs go to $OUT (default ./out): device.txt, build.log, resource_usage.txt, pytest.log (the
# whole suite, tests/test_cuda_kernels.py included), memcheck.log, racecheck.log, bench.log and
# bench/ (JSON + PNG). A short table is printed last. Each phase has a time limit so the whole run fits the lease; the
# build is incremental, so a second call can run the later phases alone.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
PHASES="${*:-build test sanitize bench}"
export MAX_JOBS="${MAX_JOBS:-16}"
# The interpreter that holds torch (on the GPU machine a bare `pip` or `python` is another one).
PY="${PYTHON:-python3}"
SANITIZER="$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)"
SUMMARY=()

# run NAME LIMIT_S LOG CMD...: runs CMD with a time limit, logs stdout+stderr, records the outcome.
run() {
  local name="$1" limit="$2" log="$3"
  shift 3
  local start=$SECONDS
  timeout "$limit" "$@" >"$log" 2>&1
  local rc=$?
  local status="ok"
  [ $rc -eq 124 ] && status="TIMEOUT(${limit}s)"
  [ $rc -ne 0 ] && [ $rc -ne 124 ] && status="FAILED(rc=$rc)"
  SUMMARY+=("$(printf '%-16s %-14s %5ss  %s' "$name" "$status" "$((SECONDS - start))" "$(basename "$log")")")
  return $rc
}

want() { [[ " $PHASES " == *" $1 "* ]]; }

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  nvcc --version | tail -1
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
} >"$OUT/device.txt" 2>&1

if want build; then
  run build 200 "$OUT/build.log" "$PY" -m pip install --no-build-isolation --no-deps -e .
  # Registers, spills and shared memory per kernel, as ptxas reports them for sm_90.
  for f in csrc/cuda/*.cu; do
    nvcc -std=c++17 -O3 --use_fast_math -gencode=arch=compute_90,code=sm_90 -Icsrc/include \
      -c "$f" -o /dev/null --resource-usage -Xptxas -warn-spills 2>&1 |
      grep -E "Compiling entry|registers|spill|warning" | sed -E 's/_ZN5lminf4cuda[0-9]+_GLOBAL__N__[0-9a-f_]+_cu_[0-9a-f]+//'
  done >"$OUT/resource_usage.txt" 2>&1
  "$PY" -c "import lm_infinite as li; print(li.build_info())" >>"$OUT/build.log" 2>&1
  # The Hopper building blocks on one tile (TMA, wgmma descriptors): a second of GPU time.
  run wgmma_tile 60 "$OUT/wgmma_tile.log" bash -c "nvcc -std=c++17 -O3 \
    -gencode=arch=compute_90a,code=sm_90a -Icsrc/include -Icsrc csrc/tests/test_wgmma_tile.cu \
    -o '$OUT/test_wgmma_tile' && '$OUT/test_wgmma_tile'"
fi

# The sanitizer runs (GPU-bound, one CPU core) overlap the test suite (float64 references on
# the CPU cores); the benchmark runs alone afterwards.
if want sanitize; then
  (
    SUMMARY=()
    run memcheck 150 "$OUT/memcheck.log" "$SANITIZER" --tool memcheck --error-exitcode 1 \
      "$PY" scripts/cuda_sanitize_cases.py
    run racecheck 150 "$OUT/racecheck.log" "$SANITIZER" --tool racecheck --error-exitcode 1 \
      "$PY" scripts/cuda_sanitize_cases.py
    printf '%s\n' "${SUMMARY[@]}" >"$OUT/.sanitize_summary"
  ) &
  SANITIZE_PID=$!
fi

if want test; then
  # pytest-xdist spreads the float64 references over the CPU cores when it is installed.
  XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8")
  run pytest 270 "$OUT/pytest.log" "$PY" -m pytest -q -m "not slow" --maxfail=30 $XDIST tests
  grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -30 >"$OUT/pytest_failures.txt"
fi

if want sanitize; then
  wait "$SANITIZE_PID"
  mapfile -t -O "${#SUMMARY[@]}" SUMMARY <"$OUT/.sanitize_summary"
fi

if want bench; then
  run bench 150 "$OUT/bench.log" "$PY" bench/attention_gpu.py --lengths 32768 --out "$OUT/bench"
fi

echo
echo "== $(head -2 "$OUT/device.txt" | tail -1)"
[ -s "$OUT/resource_usage.txt" ] && { echo "== ptxas (registers / spills)"; grep -E "registers|spill" "$OUT/resource_usage.txt" | sort | uniq -c | head -12; }
[ -f "$OUT/wgmma_tile.log" ] && echo "== wgmma tile: $(tail -2 "$OUT/wgmma_tile.log" | tr '\n' ' ')"
[ -f "$OUT/pytest.log" ] && { echo "== pytest: $(tail -1 "$OUT/pytest.log")"; cat "$OUT/pytest_failures.txt"; }
for log in memcheck racecheck; do
  [ -f "$OUT/$log.log" ] && echo "== $log: $(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$OUT/$log.log" | tail -1)"
done
[ -f "$OUT/bench.log" ] && { echo "== bench"; sed -n '/^prefill, bf16/,$p' "$OUT/bench.log"; }
echo
echo "phase            status         time   log (in $OUT)"
printf '%s\n' "${SUMMARY[@]}"
