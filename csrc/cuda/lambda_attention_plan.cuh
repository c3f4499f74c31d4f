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
  kDecode = 2,      // bf16/fp16, head_dim 64 or 128, n_queries <= 16: lambda_attention_decode.cu
};

// Tile sizes of the tensor-core kernel: 4 warps of 16 query rows, 64 keys per step.
inline constexpr int kMmaWarps = 4;
inline constexpr int kMmaBlockRows = 16 * kMmaWarps;
inline constexpr int kMmaBlockKeys = 64;

// Prefill-mode blocks skip cache tiles no query of theirs can see, from per-tile position
// bounds (cache_tile_bounds.cu), for caches of up to this many 64-slot tiles (one byte of
// shared memory each).
inline constexpr int64_t kMaxSkippableCacheTiles = 1024;

// The decode kernel (lambda_attention_decode.cu) takes chunks of up to kDecodeMaxQueries
// queries. A block stacks the rows of one KV group's query heads (row r = head_in_group *
// n_queries + t), 16 rows per block (one mma row tile), and walks keys in chunks of 64 (16 per
// warp), kDecodeStages chunks in flight.
inline constexpr int64_t kDecodeMaxQueries = 16;
inline constexpr int kDecodeTileRows = 16;
inline constexpr int kDecodeChunkKeys = 64;
inline constexpr int kDecodeStages = 3;

struct AttentionPlan {
  AttentionPath path = AttentionPath::kGeneric;
  // Query heads whose rows one block stacks: the GQA group size on the decode path, else 1.
  // Block rows are r = head_in_pack * n_queries + t.
  int64_t heads_per_block = 1;
  // Blocks along one pack's rows: ceil(heads_per_block * n_queries / block rows), the block
  // rows being kMmaBlockRows (tensor-core path) or kDecodeTileRows (decode path).
  int64_t row_tiles = 0;
  // Key ranges per row tile; > 1 writes partials that lse_merge.cu (tensor-core path) or the
  // decode merge combine. On the decode path the ranges are whole 64-key chunks of the
  // virtual key list (cache slots, then the chunk's own tokens).
  int64_t n_splits = 1;
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
Status launch_lambda_attention_decode(const LambdaAttentionParams& params,
                                     const AttentionPlan& plan, void* workspace,
                                     cudaStream_t stream);
// Blocks of the decode kernel for these params that fit on one multiprocessor (occupancy of
// its dtype / head_dim variant, read once per device).
int decode_blocks_per_sm(const LambdaAttentionParams& params);
Status launch_lambda_attention_mma(const LambdaAttentionParams& params, const AttentionPlan& plan,
                                   void* workspace, cudaStream_t stream);
Status launch_lambda_attention_generic(const LambdaAttentionParams& params,
                                       cudaStream_t stream);
Status launch_cache_tile_bounds(const LambdaAttentionParams& params, const AttentionPlan& plan,
                                void* workspace, cudaStream_t stream);
Status launch_lse_merge(const LambdaAttentionParams& params, const AttentionPlan& plan,
                        const void* workspace, cudaStream_t stream);

}  // namespace lminf::cuda
