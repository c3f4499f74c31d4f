#!/usr/bin/env bash
# On the GPU machine: issue 11 (decode kernel, bad-input crash) in one prepared run of at most
# 8 minutes on an H200 (16 cores, torch 2.11+cu130, python3).
#
#   bash scripts/gpu_decode_check.sh              # every phase
#   bash scripts/gpu_decode_check.sh build test   # a subset: diag build test sanitize bench
#
# Phases, each with a time limit (logs and JSON in $OUT, default ./out):
#   diag      toolchain, torch's build config, a one-check extension linked three ways
#             (crash_diag.log; scripts/libstdcxx_check.py)
#   build     pip install -v (the link line with -v is in build.log), then the extension's
#             libstdc++ linkage and a bad-input call in a subprocess (crash_diag.log)
#   test      tests/test_bad_input.py + test_build_link.py, the decode tests of
#             tests/test_cuda_kernels.py, and (after the bench) its other tests (pytest_*.log)
#   sanitize  compute-sanitizer memcheck and racecheck on the decode shapes, alongside the tests
#   bench     bench/attention_gpu.py --decode-only (bench.log, bench/attention_gpu.json)
# A short table is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
PHASES="${*:-diag build test sanitize bench}"
export MAX_JOBS="${MAX_JOBS:-16}"
PY="${PYTHON:-python3}"
SANITIZER="$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)"
SUMMARY=()

# run NAME LIMIT_S LOG CMD...: runs CMD with a time limit, appends stdout+stderr to LOG.
run() {
  local name="$1" limit="$2" log="$3"
  shift 3
  local start=$SECONDS
  timeout "$limit" "$@" >>"$log" 2>&1
  local rc=$?
  local status="ok"
  [ $rc -eq 124 ] && status="TIMEOUT(${limit}s)"
  [ $rc -ne 0 ] && [ $rc -ne 124 ] && status="FAILED(rc=$rc)"
  SUMMARY+=("$(printf '%-10s %-14s %5ss  %s' "$name" "$status" "$((SECONDS - start))" "$(basename "$log")")")
  return $rc
}
want() { [[ " $PHASES " == *" $1 "* ]]; }

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  nvcc --version | tail -1
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  git log --oneline -1
} >"$OUT/device.txt" 2>&1

BAD_CALL='import torch, lm_infinite as li
q, k = torch.randn(1, 4, 9, 64), torch.randn(1, 2, 9, 64)
try:
    li.lambda_attention(q, torch.randn(1, 2, 8, 64), torch.randn(1, 2, 8, 64), torch.ones(32), n_local=4)
except RuntimeError as e:
    print("raised:", str(e).splitlines()[0])'

if want diag; then
  run toolchain 20 "$OUT/crash_diag.log" "$PY" -u scripts/libstdcxx_check.py toolchain
  run repro 90 "$OUT/crash_diag.log" "$PY" -u scripts/libstdcxx_check.py repro "$OUT/repro"
fi

if want build; then
  # LDFLAGS keeps whatever the machine sets (it may be the cause) and adds -v: the real ld
  # command line lands in build.log.
  LDFLAGS="${LDFLAGS:-} -v" run build 240 "$OUT/build.log" \
    "$PY" -m pip install -v --no-build-isolation --no-deps -e .
  grep -nE "collect2|/ld |-static-libstdc|lstdc\+\+|_C\.cpython" "$OUT/build.log" | tail -8 \
    >"$OUT/link_line.txt"
  SO="$(ls python/lm_infinite/_C*.so 2>/dev/null | head -1)"
  if [ -n "$SO" ]; then
    echo "== the extension as built" >>"$OUT/crash_diag.log"
    run inspect 30 "$OUT/crash_diag.log" "$PY" -u scripts/libstdcxx_check.py inspect "$SO" "$BAD_CALL"
  fi
  "$PY" -c "import lm_infinite as li; print(li.build_info())" >>"$OUT/build.log" 2>&1
fi

if want sanitize; then
  (
    SUMMARY=()
    run memcheck 90 "$OUT/memcheck.log" "$SANITIZER" --tool memcheck --error-exitcode 1 \
      "$PY" scripts/cuda_sanitize_cases.py --decode-only
    run racecheck 90 "$OUT/racecheck.log" "$SANITIZER" --tool racecheck --error-exitcode 1 \
      "$PY" scripts/cuda_sanitize_cases.py --decode-only
    printf '%s\n' "${SUMMARY[@]}" >"$OUT/.sanitize_summary"
  ) &
  SANITIZE_PID=$!
fi

# Tests in order of importance, so that a cut-off run still has the essentials: bad input and
# linkage, then the decode tests (while the sanitizers run), the benchmark, the other CUDA tests.
DECODE_TESTS="decode or 1e9"
XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8")
if want test; then
  run bad_input 60 "$OUT/pytest_bad_input.log" "$PY" -m pytest -q tests/test_bad_input.py \
    tests/test_build_link.py
  run pytest_dec 150 "$OUT/pytest_decode.log" "$PY" -m pytest -q --maxfail=30 $XDIST \
    tests/test_cuda_kernels.py -k "$DECODE_TESTS"
fi

if want sanitize; then
  wait "$SANITIZE_PID"
  mapfile -t -O "${#SUMMARY[@]}" SUMMARY <"$OUT/.sanitize_summary"
fi

if want bench; then
  run bench 100 "$OUT/bench.log" "$PY" bench/attention_gpu.py --decode-only --out "$OUT/bench"
fi

if want test; then
  run pytest_rest 120 "$OUT/pytest_rest.log" "$PY" -m pytest -q -m "not slow" --maxfail=30 \
    $XDIST tests/test_cuda_kernels.py -k "not ($DECODE_TESTS)"
fi

echo
echo "== $(head -2 "$OUT/device.txt" | tail -1)"
if [ -f "$OUT/crash_diag.log" ]; then
  echo "== bad-input crash (crash_diag.log, link_line.txt)"
  grep -E "^== variant|NEEDED libstdc|symbols defined|bad call|number formatted|_M_insert" \
    "$OUT/crash_diag.log" | sed 's/^/  /'
fi
for log in pytest_bad_input pytest_decode pytest_rest; do
  [ -f "$OUT/$log.log" ] || continue
  echo "== $log: $(tail -1 "$OUT/$log.log")"
  grep -E "^(FAILED|ERROR)" "$OUT/$log.log" | head -15
done
for log in memcheck racecheck; do
  [ -f "$OUT/$log.log" ] && echo "== $log: $(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$OUT/$log.log" | tail -1)"
done
if [ -f "$OUT/bench/attention_gpu.json" ]; then
  echo "== decode bench (goals: batch 1 <= 6 us and >= 2.5x SDPA; batch 16 >= 3.4 TB/s)"
  "$PY" - "$OUT/bench/attention_gpu.json" <<'EOF'
import json, sys
rows = json.load(open(sys.argv[1]))
copy = next(r["tbps"] for r in rows if r["kind"] == "copy")
print(f"  device copy bandwidth {copy:.2f} TB/s")
for r in rows:
    if r["kind"] != "decode":
        continue
    if r["batch"] == 1:
        ok = r["lminf_us"] <= 6 and r["speedup_vs_sdpa"] >= 2.5
    else:
        ok = r["lminf_tbps"] >= 3.4
    print(f"  {r['heads']:>5} batch {r['batch']:>2}: {r['lminf_us']:7.2f} us {r['lminf_tbps']:5.2f} TB/s "
          f"({r['lminf_copy_fraction']:.0%} of copy), SDPA {r['sdpa_us']:7.2f} us -> "
          f"{r['speedup_vs_sdpa']:.2f}x  {'PASS' if ok else 'FAIL'}")
EOF
fi
echo
echo "phase      status         time   log (in $OUT)"
printf '%s\n' "${SUMMARY[@]}"
