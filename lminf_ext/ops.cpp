// The op schemas (defined once) and their CPU implementations.
#include <torch/library.h>

#include "tensor_params.h"

namespace lminf_ext {
namespace {

torch::Tensor lambda_attention_chunk_cpu(const torch::Tensor& q, const torch::Tensor& k,
                                         const torch::Tensor& v, const torch::Tensor& cache_k,
                                         const torch::Tensor& cache_v,
                                         const torch::Tensor& cache_positions,
                                         const torch::Tensor& query_start,
                                         const torch::Tensor& inv_freq, int64_t n_global,
                                         int64_t n_local, int64_t distance_cap, double scale,
                                         const std::optional<torch::Tensor>& middle_k,
                                         const std::optional<torch::Tensor>& middle_v,
                                         const std::optional<torch::Tensor>& middle_positions,
                                         int64_t top_k, int64_t top_k_distance,
                                         int64_t top_k_first_row) {
  const char* op = "lminf::lambda_attention_chunk";
  AttentionInputs in = make_attention_inputs(op, q, k, v, cache_k, cache_v, cache_positions,
                                             query_start, inv_freq, n_global, n_local,
                                             distance_cap, scale);
  attach_middle_store(op, in, middle_k, middle_v, middle_positions, top_k, top_k_distance,
                      top_k_first_row);
  check_status(op, lminf::lambda_attention_cpu(in.params));
  return in.out;
}

torch::Tensor lambda_attention_cpu(const torch::Tensor& q, const torch::Tensor& k,
                                   const torch::Tensor& v, const torch::Tensor& inv_freq,
                                   int64_t n_global, int64_t n_local, int64_t distance_cap,
                                   double scale) {
  const char* op = "lminf::lambda_attention";
  TORCH_CHECK(k.dim() == 4, op, ": k must be 4-D [batch, heads_kv, seq, head_dim], got shape ",
              k.sizes());
  // A whole sequence is a chunk at position 0 with an empty cache.
  const auto no_cache = k.new_empty({k.size(0), k.size(1), 0, k.size(3)});
  const auto no_positions = torch::empty({0}, k.options().dtype(torch::kInt64));
  const auto start = torch::zeros({1}, k.options().dtype(torch::kInt64));
  AttentionInputs in = make_attention_inputs(op, q, k, v, no_cache, no_cache, no_positions, start,
                                             inv_freq, n_global, n_local, distance_cap, scale);
  check_status(op, lminf::lambda_attention_cpu(in.params));
  return in.out;
}

void ring_cache_append_cpu(const torch::Tensor& cache_k, const torch::Tensor& cache_v,
                           const torch::Tensor& cache_positions, const torch::Tensor& k,
                           const torch::Tensor& v, const torch::Tensor& start_position,
                           int64_t n_global, int64_t n_local) {
  AppendInputs in = make_append_inputs(cache_k, cache_v, cache_positions, k, v, start_position,
                                       n_global, n_local);
  check_status("lminf::ring_cache_append", lminf::ring_cache_append_cpu(in.params));
}

}  // namespace

TORCH_LIBRARY(lminf, m) {
  m.def(
      "lambda_attention(Tensor q, Tensor k, Tensor v, Tensor inv_freq, int n_global, "
      "int n_local, int distance_cap, float scale) -> Tensor");
  m.def(
      "lambda_attention_chunk(Tensor q, Tensor k, Tensor v, Tensor cache_k, Tensor cache_v, "
      "Tensor cache_positions, Tensor query_start, Tensor inv_freq, int n_global, int n_local, "
      "int distance_cap, float scale, Tensor? middle_k=None, Tensor? middle_v=None, "
      "Tensor? middle_positions=None, int top_k=0, int top_k_distance=0, "
      "int top_k_first_row=0) -> Tensor");
  m.def(
      "ring_cache_append(Tensor(a!) cache_k, Tensor(b!) cache_v, Tensor(c!) cache_positions, "
      "Tensor k, Tensor v, Tensor start_position, int n_global, int n_local) -> ()");
}

TORCH_LIBRARY_IMPL(lminf, CPU, m) {
  m.impl("lambda_attention", &lambda_attention_cpu);
  m.impl("lambda_attention_chunk", &lambda_attention_chunk_cpu);
  m.impl("ring_cache_append", &ring_cache_append_cpu);
}

}  // namespace lminf_ext
