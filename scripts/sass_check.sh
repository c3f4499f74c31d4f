#!/usr/bin/env bash
# SASS and ptxas checks of the CUDA kernels, no GPU needed (see scripts/sass_check.py):
#
#   bash scripts/sass_check.sh                                  # every csrc/cuda/*.cu
#   bash scripts/sass_check.sh csrc/cuda/lambda_attention_decode.cu
#
# Needs nvcc (CUDA 12.4+, sm_90) and cuobjdump (the CUDA toolkit, or triton's wheel:
# `pip install triton`). Prints one PASS/FAIL line per kernel and rule; exits 1 on a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 scripts/sass_check.py "$@"
