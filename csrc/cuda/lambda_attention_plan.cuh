// How one lambda_attention_cuda call is cut into thread blocks, and the launchers of the
// kernels that carry it out. The plan depends on sizes only (never on device memory), so
// lambda_attention_cuda_workspace_size and lambda_attention_cuda always agree, and a captured
// CUDA graph stays valid while query_start and the cache positions advance.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "lminf/lambda_attention.h"
#include "lminf/status.h"

namespace lminf::cuda {

// The instantiations the tensor-core, decode and Hopper kernels are compiled for: element type
// bf16 or fp16, head_dim 64 or 128 (plan_attention sends every other call to the generic
// kernel). Calls launch(ElementType<T>{}, HeadDim<D>{}) for the params' case, so a launcher
// names its template once: [&](auto t, auto d) { return f<typename decltype(t)::type,
// decltype(d)::value>(...); }.
template <typename T> struct ElementType { using type = T; };
template <int D> using HeadDim = std::integral_constant<int, D>;

template <typename Launch>
auto dispatch_kernel_types(const LambdaAttentionParams& p, Launch&& launch) {
  const bool bf16 = p.dtype == DType::kBFloat16;
  if (p.head_dim == 64)
    return bf16 ? launch(ElementType<__nv_bfloat16>{}, HeadDim<64>{})
                : launch(ElementType<__half>{}, HeadDim<64>{});
  return bf16 ? launch(ElementType<__nv_bfloat16>{}, HeadDim<128>{})
              : launch(ElementType<__half>{}, HeadDim<128>{});
}

// Launcher<T, D>::run(args...) for the params' case: a kernel file's public launcher in one
// line, where Launcher<T, D> names the file's launch function for that instance
// (`template <typename T, int D> struct Launcher { static constexpr auto run = launch<T, D>; };`).
template <template <typename, int> class Launcher, typename... Args>
Status launch_kernel_types(const LambdaAttentionParams& p, Args&&... args) {
  return dispatch_kernel_types(p, [&](auto t, auto d) {
    return Launcher<typename decltype(t)::type, decltype(d)::value>::run(args...);
  });
}

enum class AttentionPath : int {
  kTensorCore = 0,  // bf16/fp16, head_dim 64 or 128: lambda_attention_mma.cu
  kGeneric = 1,     // anything else up to head_dim 256: lambda_attention_generic.cu
  kDecode = 2,      // bf16/fp16, head_dim 64 or 128, n_queries <= 16: lambda_attention_decode.cu
  kHopper = 3,      // the tensor-core path on sm_90: lambda_attention_hopper.cu (hopper_prefill.cuh)
};

// Tile sizes of the tensor-core kernel: 4 warps of 16 query rows, 64 keys per step.
inline constexpr int kMmaWarps = 4;
inline constexpr int kMmaBlockRows = 16 * kMmaWarps;
inline constexpr int kMmaBlockKeys = 64;

// Sequence b of a batch (LambdaAttentionParams): rows t < padding are padding, row t >= padding
// sits at position start + (t - padding). Read once per block; with query_start.batch_stride 0
// and no padding every sequence reads the same start and 0.
struct SequenceRows {
  int64_t start;    // position of the first real row
  int64_t padding;  // leading padding rows
  __device__ SequenceRows(const LambdaAttentionParams& p, int64_t b)
      : start(*p.query_start.of(b)),
        padding(p.padding != nullptr ? p.padding[b] : 0) {}
};

// Whether every sequence of the batch sits at the same positions (shared query start and cache
// positions, no padding): then the pre-pass's index (below) is built once for the whole batch.
inline bool sequences_share_positions(const LambdaAttentionParams& p) {
  return p.query_start.batch_stride == 0 && p.cache_positions.batch_stride == 0 &&
         p.padding == nullptr;
}

// The chunk-anchored pre-pass (rotate_chunk_keys.cu) writes, for sequence b with a = its start
// and pad = its padding (SequenceRows), n_real = n_queries - pad real rows:
//   keys    [batch][n_heads_kv][window_rows + n_queries][head_dim] T: row u < window_rows +
//           n_real holds the key at position a - window_rows + u rotated by its offset from a
//           (u - window_rows): first the cache window (cache slots gathered by position; zero
//           where none holds it), then the chunk's real rows (row window_rows + t' is chunk row
//           pad + t', offset t'); the last pad rows are not written (the kernels never read
//           past window_rows + n_real);
//   values  [batch][n_heads_kv][window_rows][head_dim] T: the window's values (the chunk's
//           own values are read from v in place);
//   global_keys, global_values [batch][n_heads_kv][global_rows][head_dim] T: the raw key and
//           value at position j < n_global in row j (zero where no slot or chunk row has it);
//   window_slot [index rows][window_rows] int32: the cache slot gathered into window row u,
//           or -1;
//   global_source [index rows][global_rows] int32: -1, a cache slot (< cache_len), or
//           cache_len + t for chunk row t (padding counted);
//   window_tile_state [index rows][window_rows / 64] uint8: kTileEmpty, kTilePartial or
//           kTileFull.
// The index arrays have one row per sequence (per_sequence), or one shared by the batch when
// sequences_share_positions; the region is sized for a row per sequence either way, so its size
// depends on sizes only.
// window_rows = n_local - 1 rounded up to kPrefillRowAlign when there is a cache (every
// position a query of the chunk can see locally in the cache lies in [a - n_local + 1, a)),
// else 0; the window is tile-aligned, so the chunk's keys start on a tile of either kernel.
// global_rows = n_global rounded up to kPrefillRowAlign.
inline constexpr int64_t kPrefillRowAlign = 128;  // the largest key tile of the prefill kernels
struct PrefillWorkspace {
  int64_t window_rows = 0, global_rows = 0;
  size_t keys = 0, values = 0, global_keys = 0, global_values = 0;  // byte offsets
  size_t window_slot = 0, global_source = 0, window_tile_state = 0;
  size_t end = 0;  // first byte after the region
  bool per_sequence = false;  // index arrays: row b for sequence b, else row 0 for all

  // The index row of sequence b.
  __host__ __device__ int64_t index_row(int64_t b) const { return per_sequence ? b : 0; }
};
inline constexpr uint8_t kTileEmpty = 0, kTilePartial = 1, kTileFull = 2;

// The pre-pass region for these sizes, placed at byte offset `base` of the workspace.
PrefillWorkspace plan_prefill_workspace(const LambdaAttentionParams& params, size_t base);

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
  size_t workspace_bytes = 0;
  // Workspace regions (byte offsets):
  //   when n_splits > 1, per output row (b, head, t) and split z:
  //     partial_out [rows][n_splits][head_dim] float32 at 0, each split's output normalised by
  //     its own softmax sum; partial_lse [rows][n_splits] float32, its log2-sum-exp (-inf if
  //     the split saw no key);
  //   then the pre-pass region (tensor-core path).
  size_t partial_lse_offset = 0;
  PrefillWorkspace prefill;
};

// Where a split kernel writes its partials in the workspace (both null without a split).
struct SplitPartials {
  float* out = nullptr;
  float* lse = nullptr;
};
inline SplitPartials split_partials(const AttentionPlan& plan, void* workspace) {
  if (plan.n_splits <= 1) return {};
  return {static_cast<float*>(workspace),
          reinterpret_cast<float*>(static_cast<char*>(workspace) + plan.partial_lse_offset)};
}

// The grid of the tensor-core prefill kernels: (row tiles x key splits, query heads, batch).
inline dim3 prefill_grid(const LambdaAttentionParams& p, const AttentionPlan& plan) {
  return dim3(static_cast<unsigned>(plan.row_tiles * plan.n_splits),
              static_cast<unsigned>(p.n_heads_q), static_cast<unsigned>(p.batch));
}

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
Status launch_rotate_chunk_keys(const LambdaAttentionParams& params, const AttentionPlan& plan,
                                void* workspace, cudaStream_t stream);
Status launch_lse_merge(const LambdaAttentionParams& params, const AttentionPlan& plan,
                        const void* workspace, cudaStream_t stream);

}  // namespace lminf::cuda
