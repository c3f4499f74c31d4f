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

namespace lminf {

inline int64_t ring_slot(int64_t position, int64_t n_global, int64_t n_local) {
  return position < n_global ? position : n_global + (position - n_global) % n_local;
}

// Writes a chunk of n_new tokens into the cache: for sequence b, rows t < padding[b] are
// padding and are not written; row t >= padding[b] is the token at position
// start_position[b * start_position_batch_stride] + (t - padding[b]).
// Tokens that a later token of the same chunk would overwrite are skipped, so a chunk longer
// than the window costs only what survives. Strides in elements, head_dim contiguous.
struct RingCacheAppendParams {
  DType dtype = DType::kFloat32;  // element type of the cache and of the new keys/values

  void* cache_k = nullptr;  // [batch, n_heads_kv, n_global + n_local, head_dim]
  int64_t cache_k_batch_stride = 0, cache_k_head_stride = 0, cache_k_row_stride = 0;
  void* cache_v = nullptr;  // [batch, n_heads_kv, n_global + n_local, head_dim]
  int64_t cache_v_batch_stride = 0, cache_v_head_stride = 0, cache_v_row_stride = 0;
  // -1 = empty; [n_global + n_local] shared by the batch (cache_positions_batch_stride 0), or
  // [batch, n_global + n_local] with that row stride. Per-sequence starts or padding need the
  // per-sequence layout.
  int64_t* cache_positions = nullptr;
  int64_t cache_positions_batch_stride = 0;

  const void* k = nullptr;  // [batch, n_heads_kv, n_new, head_dim]
  int64_t k_batch_stride = 0, k_head_stride = 0, k_row_stride = 0;
  const void* v = nullptr;  // [batch, n_heads_kv, n_new, head_dim]
  int64_t v_batch_stride = 0, v_head_stride = 0, v_row_stride = 0;

  // Position of each sequence's first real row (device memory for CUDA, so graphs can replay):
  // [batch], or [1] shared (start_position_batch_stride 0).
  const int64_t* start_position = nullptr;
  int64_t start_position_batch_stride = 0;  // 0 or 1
  const int64_t* padding = nullptr;         // [batch] leading padding rows, in [0, n_new]; null: none

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

LMINF_API Status ring_cache_append_cpu(const RingCacheAppendParams& params);

// Enqueued on `stream` (a cudaStream_t); kUnsupported in a build without CUDA.
LMINF_API Status ring_cache_append_cuda(const RingCacheAppendParams& params, void* stream);

}  // namespace lminf
