#include "tensor_params.h"

#include <string>

namespace lminf_ext {
namespace {

lminf::DType to_core_dtype(const char* op, const char* name, torch::ScalarType type) {
  switch (type) {
    case torch::kFloat32: return lminf::DType::kFloat32;
    case torch::kBFloat16: return lminf::DType::kBFloat16;
    case torch::kFloat16: return lminf::DType::kFloat16;
    default:
      TORCH_CHECK(false, op, ": ", name, " must be float32, bfloat16 or float16, got ", type);
  }
}

// Kernels need a contiguous last dimension; any other stride pattern is fine as is.
torch::Tensor rows_contiguous(const torch::Tensor& t) {
  return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous();
}

void check_4d(const char* op, const char* name, const torch::Tensor& t, const char* layout) {
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be 4-D ", layout, ", got shape ", t.sizes());
}

void check_like(const char* op, const char* name, const torch::Tensor& t, const torch::Tensor& q,
                const char* q_name) {
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), op, ": ", name, " must have the dtype of ",
              q_name, " (", q.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == q.device(), op, ": ", name, " must be on the device of ", q_name,
              " (", q.device(), "), got ", t.device());
}

void check_dim(const char* op, const char* name, const torch::Tensor& t, int dim, int64_t expected,
               const char* what) {
  TORCH_CHECK(t.size(dim) == expected, op, ": ", name, ".size(", dim, ") must equal ", what, " (",
              expected, "), got shape ", t.sizes());
}

torch::Tensor position_scalar(const char* op, const char* name, const torch::Tensor& t,
                              const torch::Device& device) {
  TORCH_CHECK(t.scalar_type() == torch::kInt64 && t.numel() == 1, op, ": ", name,
              " must be an int64 tensor with one element, got ", t.scalar_type(), " of shape ",
              t.sizes());
  TORCH_CHECK(t.device() == device, op, ": ", name, " must be on ", device, ", got ", t.device());
  return t.reshape({1}).contiguous();
}

}  // namespace

void check_status(const char* op, const lminf::Status& status) {
  TORCH_CHECK(status.ok(), op, ": ", status.message());
}

AttentionInputs make_attention_inputs(const char* op, const torch::Tensor& q,
                                      const torch::Tensor& k, const torch::Tensor& v,
                                      const torch::Tensor& cache_k, const torch::Tensor& cache_v,
                                      const torch::Tensor& cache_positions,
                                      const torch::Tensor& query_start,
                                      const torch::Tensor& inv_freq, int64_t n_global,
                                      int64_t n_local, int64_t distance_cap, double scale) {
  check_4d(op, "q", q, "[batch, heads_q, seq, head_dim]");
  check_4d(op, "k", k, "[batch, heads_kv, seq, head_dim]");
  check_4d(op, "v", v, "[batch, heads_kv, seq, head_dim]");
  check_4d(op, "cache_k", cache_k, "[batch, heads_kv, slots, head_dim]");
  check_4d(op, "cache_v", cache_v, "[batch, heads_kv, slots, head_dim]");
  const lminf::DType dtype = to_core_dtype(op, "q", q.scalar_type());
  for (const auto& [name, t] : {std::pair<const char*, const torch::Tensor&>{"k", k}, {"v", v},
                                {"cache_k", cache_k}, {"cache_v", cache_v}})
    check_like(op, name, t, q, "q");

  const int64_t batch = q.size(0), heads_q = q.size(1), seq = q.size(2), head_dim = q.size(3);
  const int64_t heads_kv = k.size(1), slots = cache_k.size(2);
  TORCH_CHECK(heads_kv >= 1 && heads_q % heads_kv == 0, op, ": q's heads (", heads_q,
              ") must be a multiple of k's heads (", heads_kv, ")");
  check_dim(op, "k", k, 0, batch, "q.size(0), the batch");
  check_dim(op, "k", k, 2, seq, "q.size(2), the sequence length");
  check_dim(op, "k", k, 3, head_dim, "q.size(3), head_dim");
  TORCH_CHECK(v.sizes() == k.sizes(), op, ": v must have k's shape ", k.sizes(), ", got ",
              v.sizes());
  check_dim(op, "cache_k", cache_k, 0, batch, "q.size(0), the batch");
  check_dim(op, "cache_k", cache_k, 1, heads_kv, "k.size(1), heads_kv");
  check_dim(op, "cache_k", cache_k, 3, head_dim, "q.size(3), head_dim");
  TORCH_CHECK(cache_v.sizes() == cache_k.sizes(), op, ": cache_v must have cache_k's shape ",
              cache_k.sizes(), ", got ", cache_v.sizes());
  TORCH_CHECK(cache_positions.scalar_type() == torch::kInt64 && cache_positions.dim() == 1 &&
                  cache_positions.size(0) == slots,
              op, ": cache_positions must be int64 of shape [", slots,
              "] (one per cache slot), got ", cache_positions.scalar_type(), " of shape ",
              cache_positions.sizes());
  TORCH_CHECK(cache_positions.device() == q.device(), op, ": cache_positions must be on ",
              q.device(), ", got ", cache_positions.device());
  TORCH_CHECK(inv_freq.dim() == 1 && inv_freq.is_floating_point(), op,
              ": inv_freq must be a 1-D float tensor [rotary_dim / 2], got ",
              inv_freq.scalar_type(), " of shape ", inv_freq.sizes());
  TORCH_CHECK(2 * inv_freq.size(0) <= head_dim, op, ": inv_freq has ", inv_freq.size(0),
              " frequencies; at most head_dim / 2 = ", head_dim / 2, " are allowed");
  TORCH_CHECK(inv_freq.device() == q.device(), op, ": inv_freq must be on ", q.device(),
              ", got ", inv_freq.device());
  TORCH_CHECK(n_local >= 1, op, ": n_local must be >= 1, got ", n_local);
  TORCH_CHECK(n_global >= 0, op, ": n_global must be >= 0, got ", n_global);
  TORCH_CHECK(distance_cap >= 0, op, ": distance_cap must be >= 0, got ", distance_cap);

  AttentionInputs in;
  in.q = rows_contiguous(q);
  in.k = rows_contiguous(k);
  in.v = rows_contiguous(v);
  in.cache_k = rows_contiguous(cache_k);
  in.cache_v = rows_contiguous(cache_v);
  in.cache_positions = cache_positions.contiguous();
  in.query_start = position_scalar(op, "query_start", query_start, q.device());
  in.inv_freq = inv_freq.to(torch::kFloat32).contiguous();
  in.out = torch::empty({batch, heads_q, seq, head_dim}, q.options());

  lminf::LambdaAttentionParams& p = in.params;
  p.dtype = dtype;
  p.q = in.q.data_ptr();
  p.q_batch_stride = in.q.stride(0), p.q_head_stride = in.q.stride(1), p.q_row_stride = in.q.stride(2);
  p.k = in.k.data_ptr();
  p.k_batch_stride = in.k.stride(0), p.k_head_stride = in.k.stride(1), p.k_row_stride = in.k.stride(2);
  p.v = in.v.data_ptr();
  p.v_batch_stride = in.v.stride(0), p.v_head_stride = in.v.stride(1), p.v_row_stride = in.v.stride(2);
  p.cache_k = in.cache_k.data_ptr();
  p.cache_k_batch_stride = in.cache_k.stride(0), p.cache_k_head_stride = in.cache_k.stride(1);
  p.cache_k_row_stride = in.cache_k.stride(2);
  p.cache_v = in.cache_v.data_ptr();
  p.cache_v_batch_stride = in.cache_v.stride(0), p.cache_v_head_stride = in.cache_v.stride(1);
  p.cache_v_row_stride = in.cache_v.stride(2);
  p.cache_positions = in.cache_positions.data_ptr<int64_t>();
  p.cache_len = slots;
  p.query_start = in.query_start.data_ptr<int64_t>();
  p.out = in.out.data_ptr();
  p.out_batch_stride = in.out.stride(0), p.out_head_stride = in.out.stride(1);
  p.out_row_stride = in.out.stride(2);
  p.inv_freq = in.inv_freq.data_ptr<float>();
  p.rotary_dim = 2 * in.inv_freq.size(0);
  p.batch = batch, p.n_heads_q = heads_q, p.n_heads_kv = heads_kv;
  p.n_queries = seq, p.head_dim = head_dim;
  p.n_global = n_global, p.n_local = n_local, p.distance_cap = distance_cap;
  p.scale = static_cast<float>(scale);
  return in;
}

void attach_middle_store(const char* op, AttentionInputs& in,
                         const std::optional<torch::Tensor>& middle_k,
                         const std::optional<torch::Tensor>& middle_v,
                         const std::optional<torch::Tensor>& middle_positions, int64_t top_k,
                         int64_t top_k_distance, int64_t top_k_first_row) {
  TORCH_CHECK(top_k >= 0, op, ": top_k must be >= 0, got ", top_k);
  if (top_k == 0) return;
  TORCH_CHECK(middle_k && middle_v && middle_positions, op,
              ": top_k > 0 needs middle_k, middle_v and middle_positions");
  TORCH_CHECK(top_k_distance >= 0, op, ": top_k_distance must be >= 0, got ", top_k_distance);
  TORCH_CHECK(top_k_first_row >= 0, op, ": top_k_first_row must be >= 0, got ", top_k_first_row);
  const torch::Tensor& q = in.q;
  check_4d(op, "middle_k", *middle_k, "[batch, heads_kv, slots, head_dim]");
  check_like(op, "middle_k", *middle_k, q, "q");
  check_like(op, "middle_v", *middle_v, q, "q");
  check_dim(op, "middle_k", *middle_k, 0, q.size(0), "q.size(0), the batch");
  check_dim(op, "middle_k", *middle_k, 1, in.k.size(1), "k.size(1), heads_kv");
  check_dim(op, "middle_k", *middle_k, 3, q.size(3), "q.size(3), head_dim");
  TORCH_CHECK(middle_v->sizes() == middle_k->sizes(), op, ": middle_v must have middle_k's shape ",
              middle_k->sizes(), ", got ", middle_v->sizes());
  const int64_t slots = middle_k->size(2);
  TORCH_CHECK(middle_positions->scalar_type() == torch::kInt64 && middle_positions->dim() == 1 &&
                  middle_positions->size(0) == slots,
              op, ": middle_positions must be int64 of shape [", slots, "], got ",
              middle_positions->scalar_type(), " of shape ", middle_positions->sizes());
  TORCH_CHECK(middle_positions->device() == q.device(), op, ": middle_positions must be on ",
              q.device(), ", got ", middle_positions->device());
  in.middle_k = rows_contiguous(*middle_k);
  in.middle_v = rows_contiguous(*middle_v);
  in.middle_positions = middle_positions->contiguous();
  lminf::LambdaAttentionParams& p = in.params;
  p.middle_k = in.middle_k.data_ptr();
  p.middle_k_batch_stride = in.middle_k.stride(0), p.middle_k_head_stride = in.middle_k.stride(1);
  p.middle_k_row_stride = in.middle_k.stride(2);
  p.middle_v = in.middle_v.data_ptr();
  p.middle_v_batch_stride = in.middle_v.stride(0), p.middle_v_head_stride = in.middle_v.stride(1);
  p.middle_v_row_stride = in.middle_v.stride(2);
  p.middle_positions = in.middle_positions.data_ptr<int64_t>();
  p.middle_len = slots;
  p.top_k = top_k, p.top_k_distance = top_k_distance, p.top_k_first_row = top_k_first_row;
}

AppendInputs make_append_inputs(const torch::Tensor& cache_k, const torch::Tensor& cache_v,
                                const torch::Tensor& cache_positions, const torch::Tensor& k,
                                const torch::Tensor& v, const torch::Tensor& start_position,
                                int64_t n_global, int64_t n_local) {
  const char* op = "lminf::ring_cache_append";
  check_4d(op, "cache_k", cache_k, "[batch, heads_kv, n_global + n_local, head_dim]");
  check_4d(op, "k", k, "[batch, heads_kv, seq, head_dim]");
  const lminf::DType dtype = to_core_dtype(op, "cache_k", cache_k.scalar_type());
  for (const auto& [name, t] : {std::pair<const char*, const torch::Tensor&>{"cache_v", cache_v},
                                {"k", k}, {"v", v}})
    check_like(op, name, t, cache_k, "cache_k");
  TORCH_CHECK(n_local >= 1, op, ": n_local must be >= 1, got ", n_local);
  TORCH_CHECK(n_global >= 0, op, ": n_global must be >= 0, got ", n_global);
  check_dim(op, "cache_k", cache_k, 2, n_global + n_local, "n_global + n_local");
  TORCH_CHECK(cache_v.sizes() == cache_k.sizes(), op, ": cache_v must have cache_k's shape ",
              cache_k.sizes(), ", got ", cache_v.sizes());
  check_dim(op, "k", k, 0, cache_k.size(0), "cache_k.size(0), the batch");
  check_dim(op, "k", k, 1, cache_k.size(1), "cache_k.size(1), heads_kv");
  check_dim(op, "k", k, 3, cache_k.size(3), "cache_k.size(3), head_dim");
  TORCH_CHECK(v.sizes() == k.sizes(), op, ": v must have k's shape ", k.sizes(), ", got ",
              v.sizes());
  // The cache is written in place, so it cannot be silently copied.
  for (const auto& [name, t] : {std::pair<const char*, const torch::Tensor&>{"cache_k", cache_k},
                                {"cache_v", cache_v}})
    TORCH_CHECK(t.stride(-1) == 1 || t.size(-1) <= 1, op, ": ", name,
                " must have a contiguous last dimension (it is written in place)");
  TORCH_CHECK(cache_positions.scalar_type() == torch::kInt64 && cache_positions.dim() == 1 &&
                  cache_positions.size(0) == cache_k.size(2) && cache_positions.is_contiguous(),
              op, ": cache_positions must be a contiguous int64 tensor of shape [",
              cache_k.size(2), "], got ", cache_positions.scalar_type(), " of shape ",
              cache_positions.sizes());
  TORCH_CHECK(cache_positions.device() == cache_k.device(), op, ": cache_positions must be on ",
              cache_k.device(), ", got ", cache_positions.device());

  AppendInputs in;
  in.k = rows_contiguous(k);
  in.v = rows_contiguous(v);
  in.start_position = position_scalar(op, "start_position", start_position, cache_k.device());
  lminf::RingCacheAppendParams& p = in.params;
  p.dtype = dtype;
  p.cache_k = cache_k.data_ptr();
  p.cache_k_batch_stride = cache_k.stride(0), p.cache_k_head_stride = cache_k.stride(1);
  p.cache_k_row_stride = cache_k.stride(2);
  p.cache_v = cache_v.data_ptr();
  p.cache_v_batch_stride = cache_v.stride(0), p.cache_v_head_stride = cache_v.stride(1);
  p.cache_v_row_stride = cache_v.stride(2);
  p.cache_positions = cache_positions.data_ptr<int64_t>();
  p.k = in.k.data_ptr();
  p.k_batch_stride = in.k.stride(0), p.k_head_stride = in.k.stride(1), p.k_row_stride = in.k.stride(2);
  p.v = in.v.data_ptr();
  p.v_batch_stride = in.v.stride(0), p.v_head_stride = in.v.stride(1), p.v_row_stride = in.v.stride(2);
  p.start_position = in.start_position.data_ptr<int64_t>();
  p.batch = k.size(0), p.n_heads_kv = k.size(1), p.n_new = k.size(2), p.head_dim = k.size(3);
  p.n_global = n_global, p.n_local = n_local;
  return in;
}

}  // namespace lminf_ext
