// The accumulator fragments of the tensor-core kernels, element by element: which row and key
// column each element of a thread's scores holds, the per-element Λ mask over them, and the
// probabilities as the A operand of P V. mma.sync m16n8k16 (a warp's 16 rows) and wgmma
// m64nNk16 (per warp of the warpgroup, its 16 rows) lay out their C fragments alike: element
// 2h + e of n8 tile n holds row lane / 4 + 8h and column 8n + 2 (lane % 4) + e.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "common.cuh"

namespace lminf::cuda {

// The key column (within the tile) of element 2h + e of n8 tile n.
__device__ __forceinline__ int fragment_column(int n, int e, int lane) {
  return 8 * n + 2 * (lane % 4) + e;
}

// Which elements of kNTiles n8 tiles the thread's two rows see, as bits 4n + 2h + e:
// valid(column) says whether the tile's column holds a key at all, seen(h, column) whether row
// half h sees it.
template <int kNTiles, class Valid, class Seen>
__device__ __forceinline__ uint32_t visible_elements(int lane, Valid&& valid, Seen&& seen) {
  static_assert(kNTiles <= 8, "one bit per element of a 32-bit word");
  uint32_t visible = 0;
#pragma unroll
  for (int n = 0; n < kNTiles; ++n)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int column = fragment_column(n, e, lane);
      if (!valid(column)) continue;
#pragma unroll
      for (int h = 0; h < 2; ++h)
        if (seen(h, column)) visible |= 1u << (4 * n + 2 * h + e);
    }
  return visible;
}

// -inf at the elements whose bit (visible_elements) is clear.
template <int kNTiles>
__device__ __forceinline__ void mask_invisible(float (&score)[kNTiles][4], uint32_t visible) {
#pragma unroll
  for (int n = 0; n < kNTiles; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i)
      if (!((visible >> (4 * n + i)) & 1u)) score[n][i] = -INFINITY;
}

// -inf wherever valid(column) && seen(h, column) is false (as visible_elements), for any
// number of tiles.
template <int kNTiles, class Valid, class Seen>
__device__ __forceinline__ void mask_unseen(float (&score)[kNTiles][4], int lane, Valid&& valid,
                                            Seen&& seen) {
#pragma unroll
  for (int n = 0; n < kNTiles; ++n)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int column = fragment_column(n, e, lane);
      const bool holds_key = valid(column);
#pragma unroll
      for (int h = 0; h < 2; ++h)
        if (!(holds_key && seen(h, column))) score[n][2 * h + e] = -INFINITY;
    }
}

// Probabilities of n8 tiles 2kk and 2kk + 1, rounded to T: exactly the A fragment of k16 step
// kk of O += P V.
template <typename T, int kNTiles>
__device__ __forceinline__ void probability_fragment(const float (&prob)[kNTiles][4], int kk,
                                                     uint32_t (&a)[4]) {
  a[0] = pack2<T>(prob[2 * kk][0], prob[2 * kk][1]);
  a[1] = pack2<T>(prob[2 * kk][2], prob[2 * kk][3]);
  a[2] = pack2<T>(prob[2 * kk + 1][0], prob[2 * kk + 1][1]);
  a[3] = pack2<T>(prob[2 * kk + 1][2], prob[2 * kk + 1][3]);
}

}  // namespace lminf::cuda
