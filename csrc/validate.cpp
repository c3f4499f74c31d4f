// Argument checks shared by the CPU and CUDA entry points. Each failure names the field and
// the value expected, so a caller (or the torch glue) can pass the message straight on.
#include <sstream>
#include <string>

#include "lminf/lambda_attention.h"
#include "lminf/ring_kv_cache.h"

namespace lminf {
namespace {

template <typename... Parts>
Status invalid(const Parts&... parts) {
  std::ostringstream message;
  (message << ... << parts);
  return Status::InvalidArgument(message.str());
}

bool known_dtype(DType dtype) {
  return dtype == DType::kFloat32 || dtype == DType::kBFloat16 || dtype == DType::kFloat16;
}

}  // namespace

Status validate(const LambdaAttentionParams& p) {
  if (!known_dtype(p.dtype)) return invalid("dtype must be float32, bfloat16 or float16");
  if (p.batch < 0) return invalid("batch must be >= 0, got ", p.batch);
  if (p.n_queries < 0) return invalid("n_queries must be >= 0, got ", p.n_queries);
  if (p.head_dim < 1) return invalid("head_dim must be >= 1, got ", p.head_dim);
  if (p.n_heads_kv < 1) return invalid("n_heads_kv must be >= 1, got ", p.n_heads_kv);
  if (p.n_heads_q < 1 || p.n_heads_q % p.n_heads_kv != 0)
    return invalid("n_heads_q must be a positive multiple of n_heads_kv (", p.n_heads_kv,
                   "), got ", p.n_heads_q);
  if (p.n_local < 1) return invalid("n_local must be >= 1, got ", p.n_local);
  if (p.n_global < 0) return invalid("n_global must be >= 0, got ", p.n_global);
  if (p.distance_cap < 0) return invalid("distance_cap must be >= 0, got ", p.distance_cap);
  if (p.rotary_dim < 0 || p.rotary_dim % 2 != 0 || p.rotary_dim > p.head_dim)
    return invalid("rotary_dim must be even and in [0, head_dim=", p.head_dim, "], got ",
                   p.rotary_dim);
  if (p.cache_len < 0) return invalid("cache_len must be >= 0, got ", p.cache_len);
  if (p.query_start == nullptr) return invalid("query_start must not be null");
  if (p.rotary_dim > 0 && p.inv_freq == nullptr) return invalid("inv_freq must not be null");
  const bool empty = p.batch == 0 || p.n_queries == 0;
  if (!empty && (p.q == nullptr || p.k == nullptr || p.v == nullptr || p.out == nullptr))
    return invalid("q, k, v and out must not be null");
  if (!empty && p.cache_len > 0 &&
      (p.cache_k == nullptr || p.cache_v == nullptr || p.cache_positions == nullptr))
    return invalid("cache_k, cache_v and cache_positions must not be null when cache_len > 0");
  if (p.top_k < 0) return invalid("top_k must be >= 0, got ", p.top_k);
  if (p.top_k > 0) {
    if (p.top_k_distance < 0)
      return invalid("top_k_distance must be >= 0, got ", p.top_k_distance);
    if (p.top_k_first_row < 0)
      return invalid("top_k_first_row must be >= 0, got ", p.top_k_first_row);
    if (p.middle_len < 0) return invalid("middle_len must be >= 0, got ", p.middle_len);
    if (!empty && p.middle_len > 0 &&
        (p.middle_k == nullptr || p.middle_v == nullptr || p.middle_positions == nullptr))
      return invalid("middle_k, middle_v and middle_positions must not be null when middle_len > 0");
  }
  return Status::Ok();
}

Status validate(const RingCacheAppendParams& p) {
  if (!known_dtype(p.dtype)) return invalid("dtype must be float32, bfloat16 or float16");
  if (p.batch < 0) return invalid("batch must be >= 0, got ", p.batch);
  if (p.n_new < 0) return invalid("n_new must be >= 0, got ", p.n_new);
  if (p.head_dim < 1) return invalid("head_dim must be >= 1, got ", p.head_dim);
  if (p.n_heads_kv < 1) return invalid("n_heads_kv must be >= 1, got ", p.n_heads_kv);
  if (p.n_local < 1) return invalid("n_local must be >= 1, got ", p.n_local);
  if (p.n_global < 0) return invalid("n_global must be >= 0, got ", p.n_global);
  if (p.start_position == nullptr) return invalid("start_position must not be null");
  if (p.cache_positions == nullptr) return invalid("cache_positions must not be null");
  if (p.batch > 0 && p.n_new > 0 &&
      (p.cache_k == nullptr || p.cache_v == nullptr || p.k == nullptr || p.v == nullptr))
    return invalid("cache_k, cache_v, k and v must not be null");
  return Status::Ok();
}

}  // namespace lminf
