// How one lambda_attention_cuda call is cut into thread blocks, and the launchers of the
// kernels that carry it out. The plan depends on sizes only (never on device memory), so
// lambda_attention_cuda_workspace_size and lambda_attention_cuda always agree, and a captured
// CUDA graph stays valid while query_start and the cache positions advance.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "lminf/lambda_attention.h"
#include "lminf/status.h"

namespace lminf::cuda {

enum class AttentionPath : int {
  kTensorCore = 0,  // bf16/fp16, head_dim 64 or 128: lambda_attention_mma.cu
  kGeneric = 1,     // anything else up to head_dim 256: lambda_attention_generic.cu
};

// Tile sizes of the tensor-core kernel: 4 warps of 16 query rows, 64 keys per step.
inline constexpr int kMmaWarps = 4;
inline constexpr int kMmaBlockRows = 16 * kMmaWarps;
inline constexpr int kMmaBlockKeys = 64;

// Prefill-mode blocks skip cache tiles no query of theirs can see, from per-tile position
// bounds (cache_tile_bounds.cu), for caches of up to this many 64-slot tiles (one byte of
// shared memory each).
inline constexpr int64_t kMaxSkippableCacheTiles = 1024;

// Queries per call up to which the tensor-core kernel runs in decode mode: all query heads
// of a KV group share a block (they read the same keys), and keys are split across blocks.
inline constexpr int64_t kDecodeMaxQueries = 16;

struct AttentionPlan {
  AttentionPath path = AttentionPath::kGeneric;
  // Query heads whose rows one block stacks: the GQA group size in decode mode, else 1.
  // Block rows are r = head_in_pack * n_queries + t.
  int64_t heads_per_block = 1;
  int64_t row_tiles = 0;  // blocks along one pack's rows: ceil(heads_per_block * n_queries / 64)
  int64_t n_splits = 1;   // key ranges per row tile; > 1 writes partials merged by lse_merge
  bool skip_cache_tiles = false;  // run cache_tile_bounds first; blocks skip invisible tiles
  size_t workspace_bytes = 0;
  // Workspace regions (byte offsets):
  //   when n_splits > 1, per output row (b, head, t) and split z:
  //     partial_out [rows][n_splits][head_dim] float32 at 0, each split's output normalised by
  //     its own softmax sum; partial_lse [rows][n_splits] float32, its log2-sum-exp (-inf if
  //     the split saw no key);
  //   when skip_cache_tiles: [cache tiles][2] int64, the min and max position of each tile.
  size_t partial_lse_offset = 0;
  size_t cache_tile_bounds_offset = 0;
};

// Chooses the path and the split for these sizes on the current device.
AttentionPlan plan_attention(const LambdaAttentionParams& params);

// Launchers (params already validated, path chosen by plan_attention).
Status launch_lambda_attention_mma(const LambdaAttentionParams& params, const AttentionPlan& plan,
                                   void* workspace, cudaStream_t stream);
Status launch_lambda_attention_generic(const LambdaAttentionParams& params,
                                       cudaStream_t stream);
Status launch_cache_tile_bounds(const LambdaAttentionParams& params, const AttentionPlan& plan,
                                void* workspace, cudaStream_t stream);
Status launch_lse_merge(const LambdaAttentionParams& params, const AttentionPlan& plan,
                        const void* workspace, cudaStream_t stream);

}  // namespace lminf::cuda
