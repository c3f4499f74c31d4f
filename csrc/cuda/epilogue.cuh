// Where the attention kernels' output rows go, and the epilogue of the tensor-core kernels:
// normalise each row by its softmax sum, then write it either to the output tensor (in T) or,
// when a row's keys are split across blocks, as this split's float32 partial row beside its
// log2-sum-exp for the merge (lse_merge.cu, the decode merge). Padding rows are zeros.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"
#include "lambda_attention_plan.cuh"
#include "lminf/lambda_attention.h"
#include "softmax.cuh"

namespace lminf::cuda {

// The output of one kernel launch: out itself (n_splits == 1), or split `split` of the
// partials (AttentionPlan: partial_out [rows][n_splits][head_dim], partial_lse
// [rows][n_splits], rows (b, head, t) in that order).
template <typename T>
struct OutputRows {
  StridedView<T> out;
  float* partial_out;
  float* partial_lse;
  int n_splits, split;
  int64_t n_heads_q, n_queries, head_dim;

  __device__ OutputRows(const LambdaAttentionParams& p, float* partial_out_, float* partial_lse_,
                        int n_splits_, int split_)
      : out(p.out.as<T>()), partial_out(partial_out_), partial_lse(partial_lse_),
        n_splits(n_splits_), split(split_), n_heads_q(p.n_heads_q), n_queries(p.n_queries),
        head_dim(p.head_dim) {}

  // Whether this launch writes split partials rather than the output.
  __device__ bool split_keys() const { return n_splits > 1; }
  // Index of row (b, head, t)'s entry for this split in partial_lse (times head_dim: in
  // partial_out).
  __device__ int64_t partial_index(int64_t b, int64_t head, int64_t t) const {
    return ((b * n_heads_q + head) * n_queries + t) * n_splits + split;
  }
};

// The epilogue of a warp's 16 rows held as tensor-core accumulators (fragment.cuh): row half h
// is chunk row row_t[h] of (b, head); rows >= n_queries are skipped, rows < pad (padding) are
// zeros whatever a mask-free tile left in them. row_sum[h] is the thread's share of the sum,
// finished across the quad here.
template <typename T, int kDTiles>
__device__ __forceinline__ void store_fragment_rows(const OutputRows<T>& dst, int64_t b,
                                                    int64_t head, const int (&row_t)[2], int pad,
                                                    float (&o)[kDTiles][4],
                                                    const float (&row_max)[2],
                                                    const float (&row_sum)[2], float scale_log2,
                                                    int lane) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float sum = quad_sum(row_sum[h]);
    if (row_t[h] >= dst.n_queries) continue;
    if (row_t[h] < pad) {
      sum = 0.f;
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt) o[dt][2 * h] = o[dt][2 * h + 1] = 0.f;
    }
    const float inv_sum = inverse_or_zero(sum);
    if (!dst.split_keys()) {
      T* const out = dst.out.at(b, head, row_t[h]);
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt)
        *reinterpret_cast<uint32_t*>(out + 8 * dt + 2 * (lane % 4)) =
            pack2<T>(o[dt][2 * h] * inv_sum, o[dt][2 * h + 1] * inv_sum);
    } else {
      const int64_t at = dst.partial_index(b, head, row_t[h]);
      float* const out = dst.partial_out + at * (kDTiles * 8);
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt)
        *reinterpret_cast<float2*>(out + 8 * dt + 2 * (lane % 4)) =
            make_float2(o[dt][2 * h] * inv_sum, o[dt][2 * h + 1] * inv_sum);
      if (lane % 4 == 0)
        dst.partial_lse[at] = log2_sum_exp(softmax_reference(row_max[h], scale_log2), sum);
    }
  }
}

// Columns [col, col + kCols) of row (b, head, t), already normalised: to the output in T
// (16-byte stores), or as this split's partial with the row's log2-sum-exp `lse` (written when
// with_lse: by one thread of the row).
template <typename T, int kCols>
__device__ __forceinline__ void store_row_columns(const OutputRows<T>& dst, int64_t b,
                                                  int64_t head, int64_t t, int col,
                                                  const float (&o)[kCols], bool with_lse,
                                                  float lse) {
  static_assert(kCols % 8 == 0, "16-byte stores");
  if (!dst.split_keys()) {
    T* const out = dst.out.at(b, head, t) + col;
#pragma unroll
    for (int i = 0; i < kCols; i += 8)
      *reinterpret_cast<uint4*>(out + i) =
          make_uint4(pack2<T>(o[i], o[i + 1]), pack2<T>(o[i + 2], o[i + 3]),
                     pack2<T>(o[i + 4], o[i + 5]), pack2<T>(o[i + 6], o[i + 7]));
    return;
  }
  const int64_t at = dst.partial_index(b, head, t);
  float* const partial = dst.partial_out + at * dst.head_dim + col;
#pragma unroll
  for (int i = 0; i < kCols; i += 4)
    *reinterpret_cast<float4*>(partial + i) = make_float4(o[i], o[i + 1], o[i + 2], o[i + 3]);
  if (with_lse) dst.partial_lse[at] = lse;
}

}  // namespace lminf::cuda
