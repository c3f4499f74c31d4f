// CPU ring-buffer append: copy each surviving token of the chunk into its slot.
#include <algorithm>
#include <cstring>

#include "lminf/ring_kv_cache.h"

namespace lminf {
namespace {

template <typename T>
void append_typed(const RingCacheAppendParams& p) {
  const int64_t start = *p.start_position;
  // Only the first n_global positions and the last n_local of the chunk survive it.
  const int64_t survivors_from = std::max<int64_t>(0, p.n_new - p.n_local);
  const size_t row_bytes = static_cast<size_t>(p.head_dim) * sizeof(T);
  for (int64_t t = 0; t < p.n_new; ++t) {
    const int64_t position = start + t;
    if (t < survivors_from && position >= p.n_global) continue;
    const int64_t slot = ring_slot(position, p.n_global, p.n_local);
    for (int64_t b = 0; b < p.batch; ++b)
      for (int64_t h = 0; h < p.n_heads_kv; ++h) {
        std::memcpy(static_cast<T*>(p.cache_k) + b * p.cache_k_batch_stride +
                        h * p.cache_k_head_stride + slot * p.cache_k_row_stride,
                    static_cast<const T*>(p.k) + b * p.k_batch_stride + h * p.k_head_stride +
                        t * p.k_row_stride,
                    row_bytes);
        std::memcpy(static_cast<T*>(p.cache_v) + b * p.cache_v_batch_stride +
                        h * p.cache_v_head_stride + slot * p.cache_v_row_stride,
                    static_cast<const T*>(p.v) + b * p.v_batch_stride + h * p.v_head_stride +
                        t * p.v_row_stride,
                    row_bytes);
      }
    p.cache_positions[slot] = position;
  }
}

}  // namespace

Status ring_cache_append_cpu(const RingCacheAppendParams& params) {
  Status status = validate(params);
  if (!status.ok()) return status;
  status = validate_position("start_position", *params.start_position, params.n_new);
  if (!status.ok()) return status;
  switch (params.dtype) {
    case DType::kFloat32: append_typed<float>(params); break;
    case DType::kBFloat16: append_typed<bf16_t>(params); break;
    case DType::kFloat16: append_typed<fp16_t>(params); break;
  }
  return Status::Ok();
}

}  // namespace lminf
