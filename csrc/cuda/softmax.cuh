// The online softmax every CUDA kernel runs, in the exp2 domain: the running maximum, the
// rescale of what was accumulated against it, and the log2-sum-exp a split leaves for the
// merge. Raw (unscaled) scores; scale_log2 = scale * log2(e) is applied inside.
#pragma once

#include <cuda_runtime.h>

#include <cmath>

namespace lminf::cuda {

// The value an online softmax subtracts before exp2: max * scale_log2, or 0 while the row has
// seen nothing (max -inf), so that exp2(-inf - 0) gives 0 rather than NaN.
__device__ __forceinline__ float softmax_reference(float max, float scale_log2) {
  return max == -INFINITY ? 0.f : max * scale_log2;
}

// The sum of x over the four lanes of a quad (lane ^ 1, lane ^ 2): an mma accumulator row's
// elements are spread over the quad that shares it.
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// The maximum of x over the four lanes of a quad.
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

// 1 / sum, or 0 for a row that saw no key (its output is zeros).
__device__ __forceinline__ float inverse_or_zero(float sum) { return sum > 0.f ? 1.f / sum : 0.f; }

// log2 of a row's softmax sum with its reference put back (the row's log2-sum-exp), -inf for a
// row that saw no key: what a split leaves beside its normalised partial row, so that the
// merge weighs the splits by 2^(lse_z - lse).
__device__ __forceinline__ float log2_sum_exp(float reference, float sum) {
  return sum > 0.f ? reference + log2f(sum) : -INFINITY;
}

// One online-softmax step over a warp's m16n8 score accumulators (element 2a + e of each tile
// belongs to row lane / 4 + 8a): the running max, sum and output accumulators are rescaled and
// the scores become probabilities in place. Shared by the mma.sync, Hopper and decode kernels
// (a wgmma accumulator has the same per-warp layout).
template <int kNTiles, int kDTiles>
__device__ __forceinline__ void online_softmax_step(float (&score)[kNTiles][4], float (&row_max)[2],
                                                    float (&row_sum)[2],
                                                    float (&out_acc)[kDTiles][4],
                                                    float scale_log2) {
#pragma unroll
  for (int a = 0; a < 2; ++a) {
    float tile_max = -INFINITY;
#pragma unroll
    for (int n = 0; n < kNTiles; ++n)
      tile_max = fmaxf(tile_max, fmaxf(score[n][2 * a], score[n][2 * a + 1]));
    tile_max = quad_max(tile_max);
    const float new_max = fmaxf(row_max[a], tile_max);
    const float ref = softmax_reference(new_max, scale_log2);
    const float correction = exp2f(row_max[a] * scale_log2 - ref);
    row_max[a] = new_max;
    row_sum[a] *= correction;
#pragma unroll
    for (int dt = 0; dt < kDTiles; ++dt) {
      out_acc[dt][2 * a] *= correction;
      out_acc[dt][2 * a + 1] *= correction;
    }
#pragma unroll
    for (int n = 0; n < kNTiles; ++n)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float prob = exp2f(fmaf(score[n][2 * a + e], scale_log2, -ref));
        score[n][2 * a + e] = prob;
        row_sum[a] += prob;
      }
  }
}

}  // namespace lminf::cuda
