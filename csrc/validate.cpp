// Argument checks shared by the CPU and CUDA entry points. Each failure names the field and
// the value expected, so a caller (or the torch glue) can pass the message straight on.
//
// Sizes are checked against what the kernels index: every window, count and position is at
// most kMaxPosition (2^62), so the sums the kernels form (n_global + n_local, a position plus
// a chunk length, a window plus a tile) never overflow int64.
#include <cmath>
#include <string>

#include "lminf/decode_linear.h"
#include "lminf/lambda_attention.h"
#include "lminf/ring_kv_cache.h"
#include "message.h"

namespace lminf {
namespace {

using detail::invalid;

bool known_dtype(DType dtype) {
  return dtype == DType::kFloat32 || dtype == DType::kBFloat16 || dtype == DType::kFloat16;
}

// The ring holds n_global + n_local slots: their sum is bounded too.
Status check_window(int64_t n_global, int64_t n_local) {
  if (n_global > kMaxPosition - n_local)
    return invalid("n_global + n_local must be at most 2^62, got ", n_global, " + ", n_local);
  return Status::Ok();
}

// "name must be in [low, kMaxPosition], got value", or Ok.
Status check_range(const char* name, int64_t value, int64_t low) {
  if (value < low || value > kMaxPosition)
    return invalid(name, " must be in [", low, ", 2^62], got ", value);
  return Status::Ok();
}

// A per-sequence array ([batch], stride 1) or one value shared by the batch (stride 0).
Status check_sequence_stride(const char* name, int64_t stride) {
  if (stride != 0 && stride != 1)
    return invalid(name, " must be 0 (one value shared by the batch) or 1 (one per sequence), got ",
                   stride);
  return Status::Ok();
}

// Slot positions are one row shared by the batch (stride 0) or one row of `length` per
// sequence: rows may be spaced further apart, never overlap.
Status check_positions_stride(const char* name, int64_t stride, int64_t length) {
  if (stride != 0 && (stride < length || stride > kMaxPosition))
    return invalid(name, " must be 0 (shared by the batch) or in [", length,
                   ", 2^62] (one row per sequence), got ", stride);
  return Status::Ok();
}

#define LMINF_RETURN_IF_ERROR(expression)   \
  do {                                      \
    Status status_ = (expression);          \
    if (!status_.ok()) return status_;      \
  } while (0)

}  // namespace

Status validate(const LambdaAttentionParams& p) {
  if (!known_dtype(p.dtype)) return invalid("dtype must be float32, bfloat16 or float16");
  LMINF_RETURN_IF_ERROR(check_range("batch", p.batch, 0));
  LMINF_RETURN_IF_ERROR(check_range("n_queries", p.n_queries, 0));
  LMINF_RETURN_IF_ERROR(check_range("head_dim", p.head_dim, 1));
  LMINF_RETURN_IF_ERROR(check_range("n_heads_kv", p.n_heads_kv, 1));
  if (p.n_heads_q < 1 || p.n_heads_q > kMaxPosition || p.n_heads_q % p.n_heads_kv != 0)
    return invalid("n_heads_q must be a positive multiple of n_heads_kv (", p.n_heads_kv,
                   "), got ", p.n_heads_q);
  LMINF_RETURN_IF_ERROR(check_range("n_local", p.n_local, 1));
  LMINF_RETURN_IF_ERROR(check_range("n_global", p.n_global, 0));
  LMINF_RETURN_IF_ERROR(check_window(p.n_global, p.n_local));
  LMINF_RETURN_IF_ERROR(check_range("distance_cap", p.distance_cap, 0));
  if (p.rotary_dim < 0 || p.rotary_dim % 2 != 0 || p.rotary_dim > p.head_dim)
    return invalid("rotary_dim must be even and in [0, head_dim=", p.head_dim, "], got ",
                   p.rotary_dim);
  LMINF_RETURN_IF_ERROR(check_range("cache_len", p.cache_len, 0));
  if (!std::isfinite(p.scale)) return invalid("scale must be a finite number, got ", p.scale);
  if (p.query_start.data == nullptr) return invalid("query_start must not be null");
  LMINF_RETURN_IF_ERROR(
      check_sequence_stride("query_start.batch_stride", p.query_start.batch_stride));
  LMINF_RETURN_IF_ERROR(check_positions_stride("cache_positions.batch_stride",
                                               p.cache_positions.batch_stride, p.cache_len));
  if (p.rotary_dim > 0 && p.inv_freq == nullptr) return invalid("inv_freq must not be null");
  const bool empty = p.batch == 0 || p.n_queries == 0;
  if (!empty &&
      (p.q.data == nullptr || p.k.data == nullptr || p.v.data == nullptr || p.out.data == nullptr))
    return invalid("q, k, v and out must not be null");
  if (!empty && p.cache_len > 0 &&
      (p.cache_k.data == nullptr || p.cache_v.data == nullptr || p.cache_positions.data == nullptr))
    return invalid("cache_k, cache_v and cache_positions must not be null when cache_len > 0");
  return Status::Ok();
}

Status validate(const LambdaAttentionParams& p, const TopKMiddleParams& m) {
  LMINF_RETURN_IF_ERROR(validate(p));
  LMINF_RETURN_IF_ERROR(check_range("top_k", m.top_k, 0));
  if (m.top_k == 0) return Status::Ok();  // plain Λ attention: the store is not read
  LMINF_RETURN_IF_ERROR(check_range("top_k_distance", m.top_k_distance, 0));
  LMINF_RETURN_IF_ERROR(check_range("top_k_first_row", m.top_k_first_row, 0));
  LMINF_RETURN_IF_ERROR(check_range("middle_len", m.middle_len, 0));
  LMINF_RETURN_IF_ERROR(check_positions_stride("middle_positions.batch_stride",
                                               m.middle_positions.batch_stride, m.middle_len));
  const bool empty = p.batch == 0 || p.n_queries == 0;
  if (!empty && m.middle_len > 0 &&
      (m.middle_k.data == nullptr || m.middle_v.data == nullptr ||
       m.middle_positions.data == nullptr))
    return invalid("middle_k, middle_v and middle_positions must not be null when middle_len > 0");
  return Status::Ok();
}

Status validate(const RingCacheAppendParams& p) {
  if (!known_dtype(p.dtype)) return invalid("dtype must be float32, bfloat16 or float16");
  LMINF_RETURN_IF_ERROR(check_range("batch", p.batch, 0));
  LMINF_RETURN_IF_ERROR(check_range("n_new", p.n_new, 0));
  LMINF_RETURN_IF_ERROR(check_range("head_dim", p.head_dim, 1));
  LMINF_RETURN_IF_ERROR(check_range("n_heads_kv", p.n_heads_kv, 1));
  LMINF_RETURN_IF_ERROR(check_range("n_local", p.n_local, 1));
  LMINF_RETURN_IF_ERROR(check_range("n_global", p.n_global, 0));
  LMINF_RETURN_IF_ERROR(check_window(p.n_global, p.n_local));
  if (p.start_position.data == nullptr) return invalid("start_position must not be null");
  if (p.cache_positions.data == nullptr) return invalid("cache_positions must not be null");
  LMINF_RETURN_IF_ERROR(
      check_sequence_stride("start_position.batch_stride", p.start_position.batch_stride));
  LMINF_RETURN_IF_ERROR(check_positions_stride("cache_positions.batch_stride",
                                               p.cache_positions.batch_stride,
                                               p.n_global + p.n_local));
  // One shared row of slot positions cannot record sequences that sit at different positions.
  if (p.batch > 1 && p.cache_positions.batch_stride == 0 &&
      (p.start_position.batch_stride != 0 || p.padding != nullptr))
    return invalid("cache_positions.batch_stride must be at least n_global + n_local (",
                   p.n_global + p.n_local, ", one row of slot positions per sequence) when ",
                   p.padding != nullptr ? "padding is given" : "start_position is per sequence",
                   ", got 0 (shared by the batch)");
  if (p.batch > 0 && p.n_new > 0 &&
      (p.cache_k.data == nullptr || p.cache_v.data == nullptr || p.k.data == nullptr ||
       p.v.data == nullptr))
    return invalid("cache_k, cache_v, k and v must not be null");
  return Status::Ok();
}

Status validate(const DecodeLinearParams& p) {
  if (!known_dtype(p.dtype)) return invalid("dtype must be float32, bfloat16 or float16");
  LMINF_RETURN_IF_ERROR(check_range("rows", p.rows, 0));
  LMINF_RETURN_IF_ERROR(check_range("in_features", p.in_features, 1));
  LMINF_RETURN_IF_ERROR(check_range("out_features", p.out_features, 1));
  // Rows may be spaced further apart than their length, never overlap.
  LMINF_RETURN_IF_ERROR(check_range("x.row_stride", p.x.row_stride, p.in_features));
  LMINF_RETURN_IF_ERROR(check_range("weight.row_stride", p.weight.row_stride, p.in_features));
  LMINF_RETURN_IF_ERROR(check_range("out.row_stride", p.out.row_stride, p.out_features));
  if (p.weight.data == nullptr) return invalid("weight must not be null");
  if (p.rows > 0 && (p.x.data == nullptr || p.out.data == nullptr))
    return invalid("x and out must not be null");
  return Status::Ok();
}

Status validate_position(const char* name, int64_t start, int64_t count) {
  if (start < 0 || start > kMaxPosition - count)
    return invalid(name, " must be in [0, 2^62 - ", count, "] (the chunk's ", count,
                   " positions must stay below 2^62), got ", start);
  return Status::Ok();
}

Status validate_sequence_positions(const char* start_name, const int64_t* start,
                                   int64_t start_stride, const int64_t* padding, int64_t batch,
                                   int64_t n_rows) {
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t pad = padding == nullptr ? 0 : padding[b];
    if (pad < 0 || pad > n_rows)
      return invalid("padding must be in [0, ", n_rows, "] (leading padding rows of the chunk), got ",
                     pad, " for sequence ", b);
    Status status = validate_position(start_name, start[b * start_stride], n_rows - pad);
    if (!status.ok()) {
      if (start_stride == 0) return status;
      return invalid(status.message(), " for sequence ", b);
    }
  }
  // An empty batch still names a bad shared start.
  if (batch == 0 && start_stride == 0) return validate_position(start_name, *start, n_rows);
  return Status::Ok();
}

}  // namespace lminf
