// The ring-buffer KV cache of LM-Infinite: the first n_global tokens plus the last n_local.
//
// Layout (one per layer): keys and values [batch, n_heads_kv, n_global + n_local, head_dim],
// unrotated, and an int64 position per slot, -1 = empty ([n_global + n_local] shared by the
// batch, or one row per sequence when the sequences sit at different positions). Position p
// lives in slot ring_slot(p): p itself when p < n_global, otherwise
// n_global + (p - n_global) mod n_local. Memory is fixed whatever the stream length.
#pragma once

#include <cstdint>

#include "lminf/dtype.h"
#include "lminf/export.h"
#include "lminf/limits.h"
#include "lminf/status.h"
#include "lminf/strided_view.h"

namespace lminf {

// The slot that holds position `position` (the layout above).
LMINF_HOST_DEVICE int64_t ring_slot(int64_t position, int64_t n_global, int64_t n_local) {
  return position < n_global ? position : n_global + (position - n_global) % n_local;
}

// Writes a chunk of n_new tokens into the cache: for sequence b, rows t < padding[b] are
// padding and are not written; row t >= padding[b] is the token at position
// *start_position.of(b) + (t - padding[b]).
// Tokens that a later token of the same chunk would overwrite are skipped, so a chunk longer
// than the window costs only what survives. Tensors are strided views (strided_view.h).
struct RingCacheAppendParams {
  DType dtype = DType::kFloat32;  // element type of the cache and of the new keys/values

  StridedView<void> cache_k;  // [batch, n_heads_kv, n_global + n_local, head_dim]
  StridedView<void> cache_v;  // [batch, n_heads_kv, n_global + n_local, head_dim]
  // -1 = empty; [n_global + n_local] shared by the batch (batch_stride 0), or
  // [batch, n_global + n_local] with that row stride. Per-sequence starts or padding need the
  // per-sequence layout.
  PerSequence<int64_t> cache_positions;

  StridedView<const void> k;  // [batch, n_heads_kv, n_new, head_dim]
  StridedView<const void> v;  // [batch, n_heads_kv, n_new, head_dim]

  // Position of each sequence's first real row (device memory for CUDA, so graphs can replay):
  // [batch] (batch_stride 1), or [1] shared (batch_stride 0).
  PerSequence<const int64_t> start_position;
  const int64_t* padding = nullptr;  // [batch] leading padding rows, in [0, n_new]; null: none

  int64_t batch = 0;
  int64_t n_heads_kv = 0;
  int64_t n_new = 0;
  int64_t head_dim = 0;
  int64_t n_global = 0;  // >= 0
  int64_t n_local = 0;   // >= 1
};

// Checks sizes, strides and pointers (per-sequence starts or padding with a shared row of slot
// positions are refused when batch > 1); the message names the offending field. The CPU entry
// point also checks each sequence's start and padding in host memory.
LMINF_API Status validate(const RingCacheAppendParams& params);

// CPU implementation: copies each surviving token's rows into its slot.
LMINF_API Status ring_cache_append_cpu(const RingCacheAppendParams& params);

// Enqueued on `stream` (a cudaStream_t); kUnsupported in a build without CUDA.
LMINF_API Status ring_cache_append_cuda(const RingCacheAppendParams& params, void* stream);

}  // namespace lminf
