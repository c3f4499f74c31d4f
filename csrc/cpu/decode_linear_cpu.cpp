// CPU kernel of decode_linear.h. The output features are shared out to the threads in
// contiguous runs, and each thread reads its run of W row after row: one sequential stream,
// which the hardware prefetcher follows. (Interleaving a few rows, to reuse each load of x,
// made many short streams, and halved the bandwidth from DRAM.) Every row of W meets up to
// kMaxRows rows of x in one pass; further rows of x pass over it again, from L1.
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

// Independent accumulators per row of x, to cover the latency of the multiply-add.
constexpr int kChains = 4;
// kMaxRows * kChains accumulators, plus the vectors of x and W in flight, fit the registers.
constexpr int kMaxRows = kVecRegisters >= 32 ? 4 : 2;
// Below this many weights per thread, waking another thread costs more than it saves.
constexpr int64_t kMinWeightsPerThread = int64_t{1} << 15;

// sums[i] = x[i] . w for kRows rows of x (float32, row stride xs, zero padded to whole
// vectors) and one row w of W of length k, of which the first k_vec are whole vectors.
template <typename T, int kRows>
void dot_row(const float* x, int64_t xs, const T* w, int64_t k_vec, int64_t k, float* sums) {
  vfloat acc[kRows][kChains] = {};
  int64_t c = 0;
  for (; c + kChains * kVecWidth <= k_vec; c += kChains * kVecWidth)
    for (int u = 0; u < kChains; ++u) {
      const vfloat wv = vload_float(w + c + u * kVecWidth);
      for (int i = 0; i < kRows; ++i) acc[i][u] += vload(x + i * xs + c + u * kVecWidth) * wv;
    }
  for (; c < k_vec; c += kVecWidth) {
    const vfloat wv = vload_float(w + c);
    for (int i = 0; i < kRows; ++i) acc[i][0] += vload(x + i * xs + c) * wv;
  }
  for (int i = 0; i < kRows; ++i) {
    float sum = vreduce_sum((acc[i][0] + acc[i][1]) + (acc[i][2] + acc[i][3]));
    for (int64_t j = k_vec; j < k; ++j) sum += x[i * xs + j] * to_float(w[j]);
    sums[i] = sum;
  }
}

// dot_row for n_rows <= kRows rows, each count its own instantiation (registers, not loops).
template <typename T, int kRows = kMaxRows>
void dot_rows(int n_rows, const float* x, int64_t xs, const T* w, int64_t k_vec, int64_t k,
              float* sums) {
  if constexpr (kRows > 1)
    if (n_rows < kRows) return dot_rows<T, kRows - 1>(n_rows, x, xs, w, k_vec, k, sums);
  dot_row<T, kRows>(x, xs, w, k_vec, k, sums);
}

template <typename T>
void run_typed(const DecodeLinearParams& p, int n_threads) {
  const int64_t k = p.in_features, k_vec = k / kVecWidth * kVecWidth;
  const int64_t xs = (k + kVecWidth - 1) / kVecWidth * kVecWidth;
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
      dot_rows<T>(n_rows, x.data() + m * xs, xs, w, k_vec, k, sums);
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
