#!/usr/bin/env bash
# CI for the torch-free C++ library, run from a clean clone (called by .ci/run):
#   1. configure, build and ctest the library (Release);
#   2. install it to a prefix, then build examples/cpp against that prefix with find_package,
#      linked shared and static, and run it;
#   3. build and ctest under AddressSanitizer + UndefinedBehaviorSanitizer;
#   4. where nvcc exists, build with -DLMINF_CUDA=ON and run the tests, which use host memory
#      (CI has no GPU: this checks that the CUDA sources compile and that a CUDA build still
#      serves host caches).
# Build trees go under $LMINF_CPP_BUILD_DIR (default build/cpp).
set -euo pipefail

cd "$(dirname "$0")/.."
root=$PWD
build=${LMINF_CPP_BUILD_DIR:-$root/build/cpp}
jobs=$(nproc)

step() { printf '\n== %s\n' "$*"; }

step "Release build and ctest"
cmake -S . -B "$build/release" -DCMAKE_BUILD_TYPE=Release
cmake --build "$build/release" -j "$jobs"
ctest --test-dir "$build/release" --output-on-failure

step "install, then examples/cpp against the installed package"
rm -rf "$build/prefix"
cmake --install "$build/release" --prefix "$build/prefix"
for link in shared static; do
  static=OFF
  [[ $link == static ]] && static=ON
  cmake -S examples/cpp -B "$build/example-$link" -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_PREFIX_PATH="$build/prefix" -DLMINF_EXAMPLE_STATIC=$static
  cmake --build "$build/example-$link" -j "$jobs"
  "$build/example-$link/stream_layers"
  "$build/example-$link/ragged_batch"
done

step "AddressSanitizer + UndefinedBehaviorSanitizer build and ctest"
cmake -S . -B "$build/asan" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DLMINF_SANITIZE=ON
cmake --build "$build/asan" -j "$jobs"
ASAN_OPTIONS=detect_leaks=1:strict_string_checks=1 UBSAN_OPTIONS=print_stacktrace=1 \
  ctest --test-dir "$build/asan" --output-on-failure

step "CUDA build (compiled, and its host paths tested: CI has no GPU)"
if command -v nvcc >/dev/null; then
  cmake -S . -B "$build/cuda" -DCMAKE_BUILD_TYPE=Release -DLMINF_CUDA=ON
  cmake --build "$build/cuda" -j "$jobs"
  ctest --test-dir "$build/cuda" --output-on-failure
else
  echo "nvcc not found: CUDA build skipped"
fi

step "C++ library: all checks passed"
