// CPU ring-buffer append: copy each surviving token of the chunk into its slot.
#include <algorithm>
#include <cstring>
#include <string>

#include "lminf/ring_kv_cache.h"

namespace lminf {
namespace {

template <typename T>
void copy_row(void* cache, int64_t cache_batch_stride, int64_t cache_head_stride,
              int64_t cache_row_stride, const void* chunk, int64_t chunk_batch_stride,
              int64_t chunk_head_stride, int64_t chunk_row_stride, int64_t b, int64_t h,
              int64_t slot, int64_t t, size_t row_bytes) {
  std::memcpy(static_cast<T*>(cache) + b * cache_batch_stride + h * cache_head_stride +
                  slot * cache_row_stride,
              static_cast<const T*>(chunk) + b * chunk_batch_stride + h * chunk_head_stride +
                  t * chunk_row_stride,
              row_bytes);
}

// Sequences one after the other: each has its own start, padding and (in the per-sequence
// layout) row of slot positions. With a shared row every sequence writes the same positions.
template <typename T>
void append_typed(const RingCacheAppendParams& p) {
  const size_t row_bytes = static_cast<size_t>(p.head_dim) * sizeof(T);
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t pad = p.padding == nullptr ? 0 : p.padding[b];
    // Row t >= pad is the token at position origin + t.
    const int64_t origin = p.start_position[b * p.start_position_batch_stride] - pad;
    int64_t* positions = p.cache_positions + b * p.cache_positions_batch_stride;
    // Only the first n_global positions and the last n_local of the chunk survive it.
    const int64_t survivors_from = std::max<int64_t>(pad, p.n_new - p.n_local);
    for (int64_t t = pad; t < p.n_new; ++t) {
      const int64_t position = origin + t;
      if (t < survivors_from && position >= p.n_global) continue;
      const int64_t slot = ring_slot(position, p.n_global, p.n_local);
      for (int64_t h = 0; h < p.n_heads_kv; ++h) {
        copy_row<T>(p.cache_k, p.cache_k_batch_stride, p.cache_k_head_stride, p.cache_k_row_stride,
                    p.k, p.k_batch_stride, p.k_head_stride, p.k_row_stride, b, h, slot, t,
                    row_bytes);
        copy_row<T>(p.cache_v, p.cache_v_batch_stride, p.cache_v_head_stride, p.cache_v_row_stride,
                    p.v, p.v_batch_stride, p.v_head_stride, p.v_row_stride, b, h, slot, t,
                    row_bytes);
      }
      positions[slot] = position;
    }
  }
}

// A ring only moves forward: a chunk must start after every position the sequence holds.
// The slot its start maps to tells, without a scan: it holds a position >= start exactly
// when the sequence already reached start (the window keeps the last n_local positions, each
// in the slot of its residue; the first n_global keep their own slots).
Status validate_append_order(const RingCacheAppendParams& p) {
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t pad = p.padding == nullptr ? 0 : p.padding[b];
    if (pad >= p.n_new) continue;  // all padding: nothing written
    const int64_t start = p.start_position[b * p.start_position_batch_stride];
    const int64_t held = p.cache_positions[b * p.cache_positions_batch_stride +
                                           ring_slot(start, p.n_global, p.n_local)];
    if (held >= start) {
      return Status::InvalidArgument(
          "start_position[" + std::to_string(b) + "] must be after the positions the cache "
          "holds (a ring cannot go back), got " + std::to_string(start) + " while position " +
          std::to_string(held) + " is stored");
    }
  }
  return Status::Ok();
}

}  // namespace

Status ring_cache_append_cpu(const RingCacheAppendParams& params) {
  Status status = validate(params);
  if (!status.ok()) return status;
  status = validate_sequence_positions("start_position", params.start_position,
                                       params.start_position_batch_stride, params.padding,
                                       params.batch, params.n_new);
  if (!status.ok()) return status;
  status = validate_append_order(params);
  if (!status.ok()) return status;
  switch (params.dtype) {
    case DType::kFloat32: append_typed<float>(params); break;
    case DType::kBFloat16: append_typed<bf16_t>(params); break;
    case DType::kFloat16: append_typed<fp16_t>(params); break;
  }
  return Status::Ok();
}

}  // namespace lminf
