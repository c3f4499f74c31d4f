#!/usr/bin/env bash
# SASS and ptxas checks of the CUDA kernels, and the prefill key loop's per-tile counts, no GPU
# needed (scripts/sass_check.py says what is checked and how the key loop is found):
#
#   bash scripts/sass_check.sh                                  # every kernel; rewrites
#                                                               # csrc/cuda/sass_prefill_after.txt
#                                                               # if the counts changed
#   bash scripts/sass_check.sh csrc/cuda/lambda_attention_decode.cu
#   python3 scripts/sass_check.py --count --by-line             # the count report alone
#
# Needs nvcc (CUDA 12.4+, sm_90/sm_90a) and nvdisasm (the CUDA toolkit, NVIDIA's wheel:
# `pip install nvidia-cuda-nvdisasm`, or triton's: `pip install triton`). Cubins are cached under build/sass/. Prints one PASS/FAIL line per
# kernel and rule; exits 1 on a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 scripts/sass_check.py "$@"
