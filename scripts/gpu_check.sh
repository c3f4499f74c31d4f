#!/usr/bin/env bash
# The prepared GPU run: two calls of at most 8 minutes each on an H200 (python3, torch 2.11+cu130).
#
#   bash scripts/gpu_check.sh first        # build, crash diagnostics, wgmma tile, decode
#   bash scripts/gpu_check.sh second       # build (skipped if unchanged), all CUDA tests, prefill bench
#   bash scripts/gpu_check.sh first --dry-run    # print the plan and the limits, run nothing
#   bash scripts/gpu_check.sh build decode_tests # named phases only
#
# Phases, by priority (limits in seconds; expected times and pass bars are in scripts/README.md):
#   first:  build (pip install --no-build-isolation -e ., LDFLAGS -v for the link line) with diag (toolchain and a
#           one-check extension linked three ways, scripts/libstdcxx_check.py) and wgmma_tile
#           (csrc/tests/test_wgmma_tile.cu on one tile) alongside; link_inspect (the built
#           _C.so's libstdc++ linkage and one bad call); bad_input (tests/test_bad_input.py,
#           test_build_link.py); decode_tests (the decode tests of tests/test_cuda_kernels.py)
#           with decode_sanitize (memcheck, racecheck on the decode shapes) alongside;
#           decode_bench.
#   second: build; hopper_tests (tests/test_cuda_hopper.py twice: the Hopper prefill kernel,
#           then LMINF_PREFILL_KERNEL=mma; if the Hopper run fails, every later phase runs
#           with mma so the rest is still checked); cuda_tests (the rest of
#           test_cuda_kernels.py, test_top_k_middle.py, test_hf_cuda.py, then all of
#           test_cuda_batched.py) with sanitize (every case, memcheck and racecheck) alongside;
#           prefill_bench_32k (the Hopper kernel vs Flex, then the mma kernel: the A/B),
#           prefill_bench_128k (whole and a 4096-token chunk, vs Flex).
# Every phase runs under `timeout` with min(its limit, what is left of LMINF_GPU_BUDGET_S,
# default 470 s); one that would get under 20 s is skipped. So a call always ends in time, and
# a slow early phase costs the later, less important ones, never the summary.
#
# $OUT (default ./out) receives at most 6 files: summary.txt (the table printed last),
# device.txt, logs.tar.gz (every log), bench_decode.json, bench_prefill_32k.json,
# bench_prefill_128k.json.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

DRY_RUN="${LMINF_GPU_DRY_RUN:-0}"
SELECT=()
for arg in "$@"; do
  if [ "$arg" = "--dry-run" ]; then DRY_RUN=1; else SELECT+=("$arg"); fi
done
[ ${#SELECT[@]} -eq 0 ] && SELECT=(first)

# name:limit, in run order; a name in {braces} runs in the background beside what follows, and
# wait_<name> is where the script waits for it.
FIRST="{diag:110} {wgmma_tile:60} build:210 wait_wgmma_tile wait_diag link_inspect:20 bad_input:45
{decode_sanitize:120} decode_tests:120 wait_decode_sanitize decode_bench:75"
SECOND="build:150 hopper_tests:200 {sanitize:190} cuda_tests:180 wait_sanitize
prefill_bench_32k:130 prefill_bench_128k:130"
PLAN=""
for s in "${SELECT[@]}"; do
  case "$s" in
    first) PLAN+=" $FIRST" ;;
    second) PLAN+=" $SECOND" ;;
    *)
      # shellcheck disable=SC2086  # one word per phase
      item="$(printf '%s\n' $FIRST $SECOND | grep -E "^\{?$s:" | head -1)"
      [ -n "$item" ] || { echo "gpu_check: unknown phase '$s' (first, second, or a phase name)" >&2; exit 2; }
      PLAN+=" $item" ;;
  esac
done

OUT="${OUT:-$PWD/out}"
LOGS="${TMPDIR:-/tmp}/lminf_gpu_check"
BUDGET="${LMINF_GPU_BUDGET_S:-470}"
export MAX_JOBS="${MAX_JOBS:-16}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export PATH="$CUDA_HOME/bin:$PATH"
PY="${PYTHON:-python3}"  # the interpreter that holds torch (a bare `python` may be another)
SANITIZER="$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")"
DECODE_TESTS="decode or 1e9"
XDIST=""  # "-n 8" when pytest-xdist is installed

# The commands of the phases. Each writes its log to $LOGS/<phase>.log (set by run_phase).
phase_build() {
  # A second call on the same machine skips the build when the sources it compiles are
  # unchanged: a content stamp, since the tree's copy may carry new mtimes each call. (build/
  # and the .so are ignored files, which the machine keeps between calls.)
  local so=(python/lm_infinite/_C*.so) stamp
  stamp="$(find csrc setup.py pyproject.toml -type f -print0 | sort -z | xargs -0 sha256sum | sha256sum)"
  if [ -e "${so[0]}" ] && [ "$stamp" = "$(cat build/gpu_check.stamp 2>/dev/null)" ]; then
    echo "extension up to date: csrc/ and setup.py unchanged since this machine built it"
  else
    # LDFLAGS keeps whatever the machine sets (it may be the bad-input crash's cause) and adds
    # -v, so the real ld command line lands in the log.
    LDFLAGS="${LDFLAGS:-} -v" LMINF_CUDA=1 "$PY" -m pip install -v --no-build-isolation --no-deps -e . &&
      mkdir -p build && echo "$stamp" >build/gpu_check.stamp || return 1
  fi
  "$PY" -c "import lm_infinite as li; print(li.build_info())"
}
phase_diag() {
  "$PY" -u scripts/libstdcxx_check.py toolchain && "$PY" -u scripts/libstdcxx_check.py repro "$LOGS/repro"
}
phase_wgmma_tile() {
  nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -Icsrc/include -Icsrc \
    csrc/tests/test_wgmma_tile.cu -o "$LOGS/test_wgmma_tile" && "$LOGS/test_wgmma_tile"
}
# shellcheck disable=SC2089  # python source, passed as one argument
BAD_CALL='import torch, lm_infinite as li
q = torch.randn(1, 4, 9, 64)
try:
    li.lambda_attention(q, torch.randn(1, 2, 8, 64), torch.randn(1, 2, 8, 64), torch.ones(32), n_local=4)
except RuntimeError as e:
    print("raised:", str(e).splitlines()[0])'
phase_link_inspect() {
  local so=(python/lm_infinite/_C*.so)
  [ -e "${so[0]}" ] || { echo "no python/lm_infinite/_C*.so: the build failed"; return 1; }
  grep -nE "collect2|/ld |-static-libstdc|lstdc\+\+|_C\.cpython" "$LOGS/build.log" | tail -8
  "$PY" -u scripts/libstdcxx_check.py inspect "${so[0]}" "$BAD_CALL"
}
phase_bad_input() { "$PY" -m pytest -q tests/test_bad_input.py tests/test_build_link.py; }
phase_decode_tests() {
  # shellcheck disable=SC2086  # XDIST is empty or two words
  "$PY" -m pytest -q --maxfail=30 $XDIST tests/test_cuda_kernels.py -k "$DECODE_TESTS"
}
# memcheck and racecheck run at once: each is one CPU thread driving the GPU.
sanitize_both() {
  "$SANITIZER" --tool memcheck --error-exitcode 1 "$PY" scripts/cuda_sanitize_cases.py "$@" \
    >"$LOGS/memcheck.log" 2>&1 &
  local mem=$!
  "$SANITIZER" --tool racecheck --error-exitcode 1 "$PY" scripts/cuda_sanitize_cases.py "$@" \
    >"$LOGS/racecheck.log" 2>&1
  local race=$?
  wait "$mem" && [ "$race" -eq 0 ]
}
phase_decode_sanitize() { sanitize_both --decode-only; }
phase_sanitize() { sanitize_both; }
phase_decode_bench() {
  "$PY" bench/attention_gpu.py --decode-only --out "$LOGS/bench_decode" &&
    cp "$LOGS/bench_decode/attention_gpu.json" "$OUT/bench_decode.json"
}
phase_cuda_tests() {
  # The batched kernels' tests (issue 16) run whole, decode ones included: the -k filter
  # below only keeps test_cuda_kernels.py's decode tests for the first call.
  local rc=0
  # shellcheck disable=SC2086
  "$PY" -m pytest -q -m "not slow" --maxfail=30 $XDIST tests/test_cuda_kernels.py \
    tests/test_top_k_middle.py tests/test_hf_cuda.py -k "not ($DECODE_TESTS)" || rc=$?
  # shellcheck disable=SC2086
  "$PY" -m pytest -q --maxfail=30 $XDIST tests/test_cuda_batched.py || rc=$?
  # The vLLM plugin's backend over the CUDA ops (a skip where the machine has no vLLM).
  PYTHON="$PY" bash scripts/vllm_ci.sh --gpu || rc=$?
  return "$rc"
}
# The Hopper kernel (auto) first, then the mma.sync fallback; a failing Hopper run stops at
# 100 s so that the fallback keeps its share. Exit status: the Hopper run's, else the mma's.
# shellcheck disable=SC2089  # python source, passed as one argument
HOPPER_SMOKE='import torch, lm_infinite as li
for dim, heads in ((128, (4, 2)), (64, (9, 3))):
    q, k, v = (torch.randn(1, h, 300, dim, dtype=torch.bfloat16, device="cuda") for h in (heads[0], heads[1], heads[1]))
    f = (1.0 / 10000 ** (torch.arange(0, dim, 2) / dim)).float()
    out = li.lambda_attention(q, k, v, f.cuda(), n_global=4, n_local=100)
    torch.cuda.synchronize()
    ref = li.lambda_attention_reference(q.double().cpu(), k.double().cpu(), v.double().cpu(), f, n_global=4, n_local=100)
    err = ((out.cpu().double() - ref).norm() / ref.norm()).item()
    print(f"smoke hd{dim}: rel err {err:.2e}")
    assert err < 2e-2, "far beyond bf16 rounding"'
phase_hopper_tests() {
  local hopper=0
  if [ "${LMINF_PREFILL_KERNEL:-auto}" != mma ]; then
    # One call per head_dim first: a hang (a wrong mbarrier phase) costs 40 s, not 100.
    timeout -k 5 40 "$PY" -c "$HOPPER_SMOKE"; hopper=$?
    # shellcheck disable=SC2086  # XDIST is empty or two words
    [ "$hopper" -eq 0 ] && { timeout -k 5 100 "$PY" -m pytest -q -x $XDIST tests/test_cuda_hopper.py; hopper=$?; }
    [ "$hopper" -eq 0 ] || touch "$LOGS/hopper_failed"
  fi
  echo "== LMINF_PREFILL_KERNEL=mma"
  # shellcheck disable=SC2086
  LMINF_PREFILL_KERNEL=mma "$PY" -m pytest -q $XDIST tests/test_cuda_hopper.py || return $?
  return "$hopper"
}
prefill_bench() {  # LENGTH NAME [bench options]
  "$PY" bench/attention_gpu.py --lengths "$1" --decode-batches 1 --out "$LOGS/$2" "${@:3}" &&
    cp "$LOGS/$2/attention_gpu.json" "$OUT/$2.json"
}
phase_prefill_bench_32k() {  # A/B: the mma run reads its Flex ratio off the first run
  local kernel=auto
  [ "${LMINF_PREFILL_KERNEL:-auto}" = mma ] && kernel=mma
  prefill_bench 32768 bench_prefill_32k --kernel "$kernel" || return $?
  [ "$kernel" = mma ] || prefill_bench 32768 bench_prefill_32k_mma --kernel mma --no-flex --chunk 0
}
phase_prefill_bench_128k() { prefill_bench 131072 bench_prefill_128k; }

START=$SECONDS
ROWS=()
CURRENT=""  # the foreground phase now running
FAILED=0  # the exit status: 1 if a phase failed, timed out or was skipped
declare -A BG_PID BG_LIMIT BG_START

left() { echo $((BUDGET - (SECONDS - START))); }
limit_for() { local l; l=$(left); echo $(($1 < l - 10 ? $1 : l - 10)); }
record() {  # NAME RC LIMIT ELAPSED
  local status=ok
  [ "$2" -eq 124 ] && status="TIMEOUT(${3}s)"
  [ "$2" -ne 0 ] && [ "$2" -ne 124 ] && status="FAILED(rc=$2)"
  [ "$2" -ne 0 ] && FAILED=1
  ROWS+=("$(printf '%-20s %-15s %5ss' "$1" "$status" "$4")")
}
skip() { ROWS+=("$(printf '%-20s %-15s' "$1" "SKIPPED(budget)")"); FAILED=1; }
run_phase() {  # NAME LIMIT: foreground
  local name="$1" limit start
  limit=$(limit_for "$2")
  if [ "$limit" -lt 20 ]; then skip "$name"; return; fi
  start=$SECONDS CURRENT=$name
  timeout -k 10 "$limit" bash -c "$(declare -f); phase_$name" >"$LOGS/$name.log" 2>&1
  record "$name" $? "$limit" $((SECONDS - start))
  CURRENT=""
}
start_phase() {  # NAME LIMIT: background, collected by wait_phase
  local name="$1" limit
  limit=$(limit_for "$2")
  if [ "$limit" -lt 20 ]; then skip "$name"; return; fi
  timeout -k 10 "$limit" bash -c "$(declare -f); phase_$name" >"$LOGS/$name.log" 2>&1 &
  BG_PID[$name]=$! BG_LIMIT[$name]=$limit BG_START[$name]=$SECONDS
}
wait_phase() {
  local name="$1"
  [ -n "${BG_PID[$name]:-}" ] || return
  wait "${BG_PID[$name]}"
  record "$name" $? "${BG_LIMIT[$name]}" $((SECONDS - BG_START[$name]))
  unset "BG_PID[$name]"
}

summary() {
  echo "== $(sed -n 2p "$LOGS/device.txt" 2>/dev/null), commit $(git log -1 --format=%h 2>/dev/null)"
  [ -f "$LOGS/diag.log" ] && grep -hE "^== variant|NEEDED libstdc|symbols defined|bad call|number formatted|_M_insert" \
    "$LOGS/diag.log" "$LOGS/link_inspect.log" 2>/dev/null | sed 's/^/  /'
  [ -f "$LOGS/wgmma_tile.log" ] && echo "== wgmma tile: $(tail -2 "$LOGS/wgmma_tile.log" | tr '\n' ' ')"
  for log in bad_input decode_tests cuda_tests; do
    [ -f "$LOGS/$log.log" ] || continue
    # pytest's result lines (cuda_tests runs it twice), else the log's last line.
    local results
    results="$(grep -E "^(=+ )?[0-9]+ (passed|failed|errors?|skipped|deselected)" "$LOGS/$log.log" |
      tail -2 | tr '\n' ' ')"
    echo "== $log: ${results:-$(tail -1 "$LOGS/$log.log")}"
    grep -E "^(FAILED|ERROR)" "$LOGS/$log.log" | head -10
  done
  for log in memcheck racecheck; do
    [ -f "$LOGS/$log.log" ] && echo "== $log: $(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$LOGS/$log.log" | tail -1)"
  done
  local json=()
  [ -f "$LOGS/hopper_failed" ] && echo "== the Hopper kernel failed its tests: later phases ran with LMINF_PREFILL_KERNEL=mma"
  [ -f "$LOGS/hopper_tests.log" ] && echo "== hopper_tests: $(grep -E "passed|failed|skipped|smoke|Error" "$LOGS/hopper_tests.log" | tr '\n' ' ')"
  for f in bench_decode bench_prefill_32k bench_prefill_32k_mma bench_prefill_128k; do
    [ -f "$OUT/$f.json" ] && json+=("$OUT/$f.json")
  done
  [ ${#json[@]} -gt 0 ] && "$PY" - "${json[@]}" <<'EOF'
import json, sys
flex = {}  # (heads, n, chunk) -> FlexAttention ms, for the mma run measured without it
for path in sys.argv[1:]:
    rows = json.load(open(path))
    for r in rows:
        if r["kind"] == "prefill" and r["flex_ms"]:
            flex[r["heads"], r["n"], r["chunk"]] = r["flex_ms"]
for path in sys.argv[1:]:
    rows = json.load(open(path))
    copy = next((r["tbps"] for r in rows if r["kind"] == "copy"), None)
    for r in rows:
        if r["kind"] == "decode" and "decode" in path:
            ok = (r["lminf_us"] <= 6 and r["speedup_vs_sdpa"] >= 2.5) if r["batch"] == 1 \
                else r["lminf_tbps"] >= 3.4
            print(f"== decode {r['heads']:>5} batch {r['batch']:>2}: {r['lminf_us']:7.2f} us "
                  f"{r['lminf_tbps']:5.2f} TB/s (copy {copy:.2f}), SDPA {r['sdpa_us']:7.2f} us, "
                  f"{r['speedup_vs_sdpa']:.2f}x  {'PASS' if ok else 'FAIL'} (batch 1: <= 6 us and "
                  f">= 2.5x SDPA; batch 16: >= 3.4 TB/s)")
        if r["kind"] == "prefill":
            flex_ms = r["flex_ms"] or flex.get((r["heads"], r["n"], r["chunk"]))
            x = flex_ms / r["lminf_ms"] if flex_ms else None
            kernel = r.get("kernel_ran", "mma")  # what the switch ran (bench: prefill_kernel)
            bar = 0.75 if kernel == "mma" else 1.25
            verdict = "-" if x is None else ("PASS" if x >= bar else "FAIL")
            print(f"== prefill {kernel:>6} {r['heads']:>5} N {r['n']:>6} chunk {r['chunk'] or '-':>4}: "
                  f"{r['lminf_ms']:8.3f} ms {r['lminf_tflops']:6.1f} TF/s, Flex "
                  f"{flex_ms if flex_ms is None else round(flex_ms, 3)} ms -> "
                  f"{'-' if x is None else f'{x:.2f}'}x  {verdict} (>= {bar}x Flex)")
EOF
  echo
  echo "phase                status          time  (budget ${BUDGET}s, used $((SECONDS - START))s)"
  printf '%s\n' "${ROWS[@]}"
}

finish() {
  trap - EXIT TERM INT
  # Interrupted (the caller's time limit): stop what still runs, and say so in the table.
  for name in $CURRENT "${!BG_PID[@]}"; do
    [ -n "${BG_PID[$name]:-}" ] && kill "${BG_PID[$name]}" 2>/dev/null
    ROWS+=("$(printf '%-20s %-15s' "$name" "INTERRUPTED")")
    FAILED=1
  done
  summary | tee "$LOGS/summary.txt"
  cp "$LOGS/summary.txt" "$LOGS/device.txt" "$OUT/" 2>/dev/null
  tar -C "$LOGS" -czf "$OUT/logs.tar.gz" --exclude=test_wgmma_tile --exclude='repro/*.so' \
    --exclude='repro/*.o' . 2>/dev/null
  exit "$FAILED"
}

if [ "$DRY_RUN" = 1 ]; then
  echo "plan (${SELECT[*]}), budget ${BUDGET}s; limits in seconds:"
  total=0
  for item in $PLAN; do
    case "$item" in
      wait_*) echo "  wait for ${item#wait_}" ;;
      \{*) item="${item#\{}"; item="${item%\}}"; echo "  start ${item%%:*} in the background, limit ${item##*:}" ;;
      *) echo "  run ${item%%:*}, limit ${item##*:}"; total=$((total + ${item##*:})) ;;
    esac
  done
  echo "sum of the foreground limits: ${total}s (capped by the budget: phases left with < 20 s are skipped)"
  exit 0
fi

rm -rf "$LOGS" && mkdir -p "$LOGS" "$OUT"
trap finish EXIT
trap 'exit 143' TERM INT
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  nvcc --version | tail -1
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  git log --oneline -1
} >"$LOGS/device.txt" 2>&1
# pytest-xdist spreads the float64 references over the CPU cores when it is installed.
"$PY" -c "import xdist" 2>/dev/null && XDIST="-n 8"
# Each phase runs as `bash -c` under timeout (which kills its whole process group), so the
# functions travel as text (declare -f) and the variables they read through the environment.
# shellcheck disable=SC2090
export LOGS OUT PY SANITIZER DECODE_TESTS BAD_CALL XDIST HOPPER_SMOKE

for item in $PLAN; do
  case "$item" in
    wait_*) wait_phase "${item#wait_}" ;;
    \{*) item="${item#\{}"; item="${item%\}}"; start_phase "${item%%:*}" "${item##*:}" ;;
    *) run_phase "${item%%:*}" "${item##*:}"
       # A Hopper kernel that failed (or hung) must not take the later phases down with it.
       [ -f "$LOGS/hopper_failed" ] && export LMINF_PREFILL_KERNEL=mma ;;
  esac
done
for name in "${!BG_PID[@]}"; do wait_phase "$name"; done
