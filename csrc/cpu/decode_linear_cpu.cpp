// CPU kernel of decode_linear.h. The output features are shared out to the threads in
// contiguous runs, and each thread reads its run of W row after row: one sequential stream,
// which the hardware prefetcher follows. (Interleaving a few rows, to reuse each load of x,
// made many short streams, and halved the bandwidth from DRAM.) Every row of W meets up to
// kMaxRows rows of x in one pass; further rows of x pass over it again, from L1.
//
// Each row's sum is formed in the same order whatever the number of rows (kChains partial
// sums, folded alike), so a sequence's output does not depend on which others share the call:
// a batched decode step gives each sequence the bits it gets alone.
#include <omp.h>

#include <algorithm>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#include "convert.h"
#include "lminf/decode_linear.h"
#include "simd.h"

namespace lminf {
namespace cpu {
namespace {

// Independent accumulators per row of x, to cover the latency of the multiply-add (one chain
// leaves a bfloat16 row short of the memory's speed on one core). Fixed: it sets the order of
// each row's sum.
constexpr int kChains = 2;
// kMaxRows * kChains accumulators, plus the vectors of x and W in flight, fit the registers.
// Passes of more rows read W once for more of them: from 2 to 4 rows per pass (and the
// prefetch below), float32 SmolLM2 weights on 2 AVX2 cores took 53-62 ms for 8 rows instead of
// 73-97, 47 for 4 instead of 60, 1 row unchanged (bench/decode_linear_cpu.py).
constexpr int kMaxRows = kVecRegisters >= 32 ? 8 : 4;
// With several rows the multiply-adds take long enough that the hardware prefetcher falls
// behind the stream of W: ask for the line this far ahead (8 rows, a stand-alone loop:
// 10 -> 13 GB/s; 1 row gains nothing, so passes of few rows leave it to the hardware).
constexpr int kPrefetchBytes = 4096;
constexpr int kPrefetchFromRows = 3;
// Below this many weights per thread, waking another thread costs more than it saves.
constexpr int64_t kMinWeightsPerThread = int64_t{1} << 15;

// Elements of W one step of the loop below consumes: kChains vectors.
constexpr int kStep = kChains * kVecWidth;

// acc[i][u] += x[i][u-th vector] * w[u] for one step (x at its step's first column).
template <int kRows>
inline void accumulate_step(vfloat (&acc)[kRows][kChains], const float* x, int64_t xs,
                            const vfloat (&w)[kChains]) {
  for (int u = 0; u < kChains; ++u)
    for (int i = 0; i < kRows; ++i) acc[i][u] += vload(x + i * xs + u * kVecWidth) * w[u];
}

// sums[i] = x[i] . w for kRows rows of x (float32, row stride xs, zero padded to whole steps)
// and one row w of W of length k. W's last partial step is read through a zero-padded copy,
// so every element goes through the one multiply-add of accumulate_step: a separate tail loop
// was fused differently in different instantiations, and a row alone differed in its last bits
// from the same row among others.
template <typename T, int kRows>
void dot_row(const float* x, int64_t xs, const T* w, int64_t k, float* sums) {
  vfloat acc[kRows][kChains] = {};
  vfloat wv[kChains];
  int64_t c = 0;
  for (; c + kStep <= k; c += kStep) {
    if constexpr (kRows >= kPrefetchFromRows)
      __builtin_prefetch(reinterpret_cast<const char*>(w + c) + kPrefetchBytes);
    for (int u = 0; u < kChains; ++u) wv[u] = vload_float(w + c + u * kVecWidth);
    accumulate_step<kRows>(acc, x + c, xs, wv);
  }
  if (c < k) {
    float tail[kStep] = {};
    row_to_float(w + c, tail, k - c);
    for (int u = 0; u < kChains; ++u) wv[u] = vload(tail + u * kVecWidth);
    accumulate_step<kRows>(acc, x + c, xs, wv);
  }
  for (int i = 0; i < kRows; ++i) {
    vfloat folded = acc[i][0];
    for (int u = 1; u < kChains; ++u) folded += acc[i][u];
    sums[i] = vreduce_sum(folded);
  }
}

// dot_row for n_rows <= kRows rows, each count its own instantiation (registers, not loops).
template <typename T, int kRows = kMaxRows>
void dot_rows(int n_rows, const float* x, int64_t xs, const T* w, int64_t k, float* sums) {
  if constexpr (kRows > 1)
    if (n_rows < kRows) return dot_rows<T, kRows - 1>(n_rows, x, xs, w, k, sums);
  dot_row<T, kRows>(x, xs, w, k, sums);
}

template <typename T>
void run_typed(const DecodeLinearParams& p, int n_threads) {
  const int64_t k = p.in_features;
  const int64_t xs = (k + kStep - 1) / kStep * kStep;
  // x once as float32 rows, so the weight loop converts only W.
  std::vector<float> x(static_cast<size_t>(p.rows * xs), 0.f);
  const RowsView<const T> x_rows = p.x.as<const T>();
  for (int64_t m = 0; m < p.rows; ++m)
    row_to_float(x_rows.row(m), x.data() + m * xs, k);

  const RowsView<const T> weight = p.weight.as<const T>();
  const auto* bias = static_cast<const T*>(p.bias);
  const RowsView<T> out = p.out.as<T>();
  const int64_t useful = std::max<int64_t>(1, p.out_features * k / kMinWeightsPerThread);
  const int threads = static_cast<int>(std::min<int64_t>(
      {n_threads > 0 ? n_threads : omp_get_max_threads(), p.out_features, useful}));
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t n = 0; n < p.out_features; ++n) {
    const T* w = weight.row(n);
    const float b = bias == nullptr ? 0.f : to_float(bias[n]);
    for (int64_t m = 0; m < p.rows; m += kMaxRows) {
      const int n_rows = static_cast<int>(std::min<int64_t>(kMaxRows, p.rows - m));
      float sums[kMaxRows];
      dot_rows<T>(n_rows, x.data() + m * xs, xs, w, k, sums);
      for (int i = 0; i < n_rows; ++i) out.row(m + i)[n] = from_float<T>(sums[i] + b);
    }
  }
}

}  // namespace
}  // namespace cpu

Status decode_linear_cpu(const DecodeLinearParams& params, int n_threads) {
  Status status = validate(params);
  if (!status.ok() || params.rows == 0) return status;
  // The only exception is the allocation of x as float32, before the parallel region.
  try {
    switch (params.dtype) {
      case DType::kFloat32: cpu::run_typed<float>(params, n_threads); break;
      case DType::kBFloat16: cpu::run_typed<bf16_t>(params, n_threads); break;
      case DType::kFloat16: cpu::run_typed<fp16_t>(params, n_threads); break;
    }
  } catch (const std::bad_alloc&) {
    return Status::OutOfMemory("decode_linear_cpu: cannot allocate " + std::to_string(params.rows) +
                               " rows of " + std::to_string(params.in_features) + " float32s");
  } catch (const std::length_error&) {
    return Status::OutOfMemory("decode_linear_cpu: rows * in_features exceeds the address space");
  }
  return Status::Ok();
}

}  // namespace lminf
