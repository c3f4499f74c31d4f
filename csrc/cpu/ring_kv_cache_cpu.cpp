// CPU ring-buffer append: copy each surviving token of the chunk into its slot.
#include <algorithm>
#include <cstring>
#include <string>

#include "lminf/ring_kv_cache.h"

namespace lminf {
namespace {

// Sequences one after the other: each has its own start, padding and (in the per-sequence
// layout) row of slot positions. With a shared row every sequence writes the same positions.
template <typename T>
void append_typed(const RingCacheAppendParams& p) {
  const size_t row_bytes = static_cast<size_t>(p.head_dim) * sizeof(T);
  const StridedView<T> cache_k = p.cache_k.as<T>(), cache_v = p.cache_v.as<T>();
  const StridedView<const T> k = p.k.as<const T>(), v = p.v.as<const T>();
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t pad = p.padding == nullptr ? 0 : p.padding[b];
    // Row t >= pad is the token at position origin + t.
    const int64_t origin = *p.start_position.of(b) - pad;
    int64_t* positions = p.cache_positions.of(b);
    // Only the first n_global positions and the last n_local of the chunk survive it.
    const int64_t survivors_from = std::max<int64_t>(pad, p.n_new - p.n_local);
    for (int64_t t = pad; t < p.n_new; ++t) {
      const int64_t position = origin + t;
      if (t < survivors_from && position >= p.n_global) continue;
      const int64_t slot = ring_slot(position, p.n_global, p.n_local);
      for (int64_t h = 0; h < p.n_heads_kv; ++h) {
        std::memcpy(cache_k.at(b, h, slot), k.at(b, h, t), row_bytes);
        std::memcpy(cache_v.at(b, h, slot), v.at(b, h, t), row_bytes);
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
    const int64_t start = *p.start_position.of(b);
    const int64_t held = p.cache_positions.of(b)[ring_slot(start, p.n_global, p.n_local)];
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
  status = validate_sequence_positions("start_position", params.start_position.data,
                                       params.start_position.batch_stride, params.padding,
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
