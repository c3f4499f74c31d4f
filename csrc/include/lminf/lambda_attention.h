// LM-Infinite (Λ-shaped) attention: the torch-free entry points.
//
// For a query at position i and a key at position j <= i (q, k unrotated, R_p the rotary
// rotation by angle p * inv_freq, s the scale):
//   local   i - j <  n_local                      score = s * (R_i q) . (R_j k)
//   global  i - j >= n_local and j < n_global     score = s * (R_distance_cap q) . k
//   else    masked
// One softmax over the unmasked keys of the row; output = weights . v.
//
// Top-k middle attention (the paper's variant for retrieval; lambda_attention_top_k_cpu): rows
// t >= top_k_first_row also attend, per query head, to the top_k keys at positions in
// [n_global, i - n_local] (the keys the Λ mask hides), each scored s * (R_top_k_distance q) . k,
// in the same softmax. Candidates are the middle store's keys (earlier tokens) and the chunk's
// own keys.
//
// Angles are only ever taken of small relative numbers: the kernels subtract int64 positions
// first, so a stream at position 10^9 gives the same result as one at 10^3.
//
// Non-finite inputs: a row is NaN when a key it sees (with top-k: every candidate, and the
// chosen values) has a NaN or infinite score or value; keys it does not see (masked, empty
// slots) never affect it, and a row that sees no key is zeros. The CPU kernel implements this;
// the CUDA kernels are not yet checked against it.
//
// Bad arguments: validate() names the field and the range (sizes and positions at most 2^62,
// limits.h; a finite scale; batch strides 0 or 1 for query_start, 0 or at least a row for slot
// positions). The CPU entry point also checks the values it reads from host memory (each
// sequence's query_start and padding, with validate_sequence_positions of limits.h, and
// inv_freq); a CUDA caller must pass positions and padding in range itself.
#pragma once

#include <cstddef>
#include <cstdint>

#include "lminf/dtype.h"
#include "lminf/export.h"
#include "lminf/limits.h"
#include "lminf/status.h"
#include "lminf/strided_view.h"

namespace lminf {

// One call attends a chunk of n_queries consecutive query tokens to
//   (a) the keys/values of the same tokens (k, v), causally, and
//   (b) an optional cache of earlier tokens (cache_k, cache_v) whose slots carry explicit
//       positions (for example the ring buffer of ring_kv_cache.h).
// A whole sequence is the special case cache_len == 0, query_start == 0.
// Tensors are strided views (strided_view.h: strides in elements, the last (head_dim)
// dimension contiguous). All pointers refer to host memory for the CPU entry point and to
// device memory for CUDA.
struct LambdaAttentionParams {
  DType dtype = DType::kFloat32;  // element type of q, k, v, cache_k, cache_v and out

  StridedView<const void> q;  // [batch, n_heads_q, n_queries, head_dim]
  // The chunk's own tokens: keys and values [batch, n_heads_kv, n_queries, head_dim].
  StridedView<const void> k;
  StridedView<const void> v;

  // [batch, n_heads_kv, cache_len, head_dim] each; data null if cache_len == 0.
  StridedView<const void> cache_k;
  StridedView<const void> cache_v;
  // Absolute position of each cache slot, negative = empty: [cache_len] shared by the batch
  // (batch_stride 0) or [batch, cache_len] with that row stride (>= cache_len).
  // Every present slot of sequence b must hold a position < query_start of b (an earlier token).
  PerSequence<const int64_t> cache_positions;
  int64_t cache_len = 0;

  // Positions of the chunk's rows, sequence by sequence, so that a batch of different lengths
  // behaves as if each sequence ran alone. Rows t < padding[b] are padding: no query attends to
  // them and their output rows are zeros. Row t >= padding[b] sits at position
  //   *query_start.of(b) + (t - padding[b]),
  // so query_start is the position of the sequence's first real row. Pointers (device memory
  // for CUDA) so that a captured CUDA graph can advance them without re-capture.
  PerSequence<const int64_t> query_start;  // [batch] (batch_stride 1), or [1] shared (0)
  const int64_t* padding = nullptr;  // [batch] leading padding rows, in [0, n_queries]; null: none

  StridedView<void> out;  // [batch, n_heads_q, n_queries, head_dim], written in dtype

  const float* inv_freq = nullptr;  // [rotary_dim / 2] rotary frequencies, float32
  int64_t rotary_dim = 0;  // even, <= head_dim; rotate_half over the first rotary_dim features

  int64_t batch = 0;
  int64_t n_heads_q = 0;   // a multiple of n_heads_kv (query head h reads kv head h / group)
  int64_t n_heads_kv = 0;
  int64_t n_queries = 0;
  int64_t head_dim = 0;

  int64_t n_global = 10;       // G: keys at positions < G stay visible at any distance
  int64_t n_local = 0;         // L: keys at distance 0 .. L-1 are attended normally (>= 1)
  int64_t distance_cap = 0;    // D: rotary distance given to global keys beyond the window
  float scale = 0.f;           // score multiplier, usually head_dim^-0.5
};

// Top-k middle attention's extra inputs (lambda_attention_top_k_cpu): a middle store of earlier
// tokens laid out like the cache, and how many of its keys each row takes. Pointers follow the
// LambdaAttentionParams they go with (host memory for the CPU entry point).
struct TopKMiddleParams {
  // Keys and values of the store; data null if middle_len == 0. Only positions in
  // [n_global, i - n_local] are candidates for query i, so the store may also hold keys that
  // the window still covers.
  StridedView<const void> middle_k;  // [batch, n_heads_kv, middle_len, head_dim]
  StridedView<const void> middle_v;  // [batch, n_heads_kv, middle_len, head_dim]
  // Position of each slot, negative = empty: [middle_len] shared (batch_stride 0), or
  // [batch, middle_len] with that row stride (>= middle_len).
  PerSequence<const int64_t> middle_positions;
  int64_t middle_len = 0;        // slots in the store
  int64_t top_k = 0;             // middle keys per query head and row; 0: plain Λ attention
  int64_t top_k_distance = 0;    // rotary distance at which the chosen middle keys are placed
  int64_t top_k_first_row = 0;   // first chunk row (0-based, padding rows counted) using top-k
};

// Checks sizes, strides and pointers (not the contents of device memory). The message names
// the first offending field and the value it expects.
LMINF_API Status validate(const LambdaAttentionParams& params);

// validate(params), then the top-k fields (ranges, the middle store's stride and pointers).
LMINF_API Status validate(const LambdaAttentionParams& params, const TopKMiddleParams& top_k);

// CPU implementation: tiled, online softmax, vectorised, multi-threaded with OpenMP.
// n_threads <= 0 uses the OpenMP default. Work grows as n_queries * (n_global + n_local).
LMINF_API Status lambda_attention_cpu(const LambdaAttentionParams& params, int n_threads = 0);

// CPU implementation with top-k middle attention: lambda_attention_cpu's result, except that rows
// t >= top_k.top_k_first_row also attend to their top_k middle keys (see the top of this file).
// Extra work per such row: (middle_len + n_queries) * head_dim per query head. top_k == 0 is
// lambda_attention_cpu. No CUDA counterpart yet (the Python package composes it from PyTorch
// ops on CUDA).
LMINF_API Status lambda_attention_top_k_cpu(const LambdaAttentionParams& params,
                                            const TopKMiddleParams& top_k, int n_threads = 0);

// Bytes of device scratch lambda_attention_cuda needs for these sizes (the tensor-core path's
// keys rotated relative to the chunk start and its gathered cache window, split-key partials).
// Depends only on sizes, so a caller can allocate it once.
LMINF_API size_t lambda_attention_cuda_workspace_size(const LambdaAttentionParams& params);

// CUDA implementation, enqueued on `stream` (a cudaStream_t; null = default stream). No
// allocation and no host synchronisation, so it can be captured in a CUDA graph. `workspace`
// must hold lambda_attention_cuda_workspace_size(params) bytes of device memory. Returns
// kUnsupported in a build without CUDA.
LMINF_API Status lambda_attention_cuda(const LambdaAttentionParams& params, void* workspace, void* stream);

}  // namespace lminf
