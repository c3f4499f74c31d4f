// The smallest and the largest position held by each 64-slot tile of a KV cache (empty slots
// excluded; an empty tile gets min > max). With them the tensor-core kernel skips, without
// loading them, cache tiles that no query of a block can see: the empty ring at the start of a
// stream, or slots far behind a long chunk. Run before lambda_attention_mma_kernel in prefill
// mode; decode skips it (a full ring is visible, and the extra launch would cost latency).
#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"
#include "lambda_attention_plan.cuh"

namespace lminf::cuda {
namespace {

constexpr int kThreads = kMmaBlockKeys;  // one slot per thread, one block per tile
constexpr int kWarps = kThreads / 32;

__global__ void __launch_bounds__(kThreads)
    cache_tile_bounds_kernel(const int64_t* __restrict__ positions, int64_t cache_len,
                             int64_t* __restrict__ bounds) {
  __shared__ int64_t warp_lo[kWarps], warp_hi[kWarps];
  const int64_t slot = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t position = slot < cache_len ? positions[slot] : -1;
  int64_t lo = position >= 0 ? position : INT64_MAX;
  int64_t hi = position;  // -1 when empty
  for (int offset = 16; offset > 0; offset /= 2) {
    lo = min64(lo, __shfl_xor_sync(0xffffffffu, lo, offset));
    hi = max64(hi, __shfl_xor_sync(0xffffffffu, hi, offset));
  }
  if (threadIdx.x % 32 == 0) {
    warp_lo[threadIdx.x / 32] = lo;
    warp_hi[threadIdx.x / 32] = hi;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kWarps; ++w) {
      lo = min64(lo, warp_lo[w]);
      hi = max64(hi, warp_hi[w]);
    }
    bounds[2 * blockIdx.x] = lo;
    bounds[2 * blockIdx.x + 1] = hi;
  }
}

}  // namespace

Status launch_cache_tile_bounds(const LambdaAttentionParams& params, const AttentionPlan& plan,
                                void* workspace, cudaStream_t stream) {
  const int64_t tiles = (params.cache_len + kMmaBlockKeys - 1) / kMmaBlockKeys;
  auto* bounds = reinterpret_cast<int64_t*>(static_cast<char*>(workspace) +
                                            plan.cache_tile_bounds_offset);
  cache_tile_bounds_kernel<<<static_cast<unsigned>(tiles), kThreads, 0, stream>>>(
      params.cache_positions, params.cache_len, bounds);
  return launch_status("cache_tile_bounds_kernel");
}

}  // namespace lminf::cuda
