// The op schemas (defined once) and their CPU implementations.
#include <torch/library.h>

#include "op_impls.h"

namespace lminf_ext {
namespace {

void attend_cpu(const char* op, AttentionInputs& in) {
  check_status(op, lminf::lambda_attention_cpu(in.params));
}

// Λ attention with top-k middle attention on its rows top_k_first_row..; CPU only (on CUDA,
// lm_infinite.ops registers a composition of the plain kernel and PyTorch ops).
torch::Tensor lambda_attention_chunk_top_k_cpu(
    const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
    const torch::Tensor& cache_k, const torch::Tensor& cache_v,
    const torch::Tensor& cache_positions, const torch::Tensor& query_start,
    const torch::Tensor& inv_freq, int64_t n_global, int64_t n_local, int64_t distance_cap,
    double scale, const torch::Tensor& middle_k, const torch::Tensor& middle_v,
    const torch::Tensor& middle_positions, int64_t top_k, int64_t top_k_distance,
    int64_t top_k_first_row, const std::optional<torch::Tensor>& padding) {
  AttentionInputs in = lambda_attention_chunk_top_k_inputs(
      q, k, v, cache_k, cache_v, cache_positions, query_start, inv_freq, n_global, n_local,
      distance_cap, scale, middle_k, middle_v, middle_positions, top_k, top_k_distance,
      top_k_first_row, padding);
  check_status("lminf::lambda_attention_chunk_top_k",
               lminf::lambda_attention_top_k_cpu(in.params, in.top_k));
  return in.out;
}

void append_cpu(const char* op, AppendInputs& in) {
  check_status(op, lminf::ring_cache_append_cpu(in.params));
}

// x W^T + bias for the few rows of a decode step; CPU only (the GPU's GEMMs do this well).
torch::Tensor decode_linear_cpu(const torch::Tensor& x, const torch::Tensor& weight,
                                const std::optional<torch::Tensor>& bias) {
  const char* op = "lminf::decode_linear";
  LinearInputs in = make_linear_inputs(op, x, weight, bias);
  check_status(op, lminf::decode_linear_cpu(in.params));
  return in.out.view(in.out_shape);
}

}  // namespace

TORCH_LIBRARY(lminf, m) {
  m.def(
      "lambda_attention(Tensor q, Tensor k, Tensor v, Tensor inv_freq, int n_global, "
      "int n_local, int distance_cap, float scale, Tensor? padding=None) -> Tensor");
  m.def(
      "lambda_attention_chunk(Tensor q, Tensor k, Tensor v, Tensor cache_k, Tensor cache_v, "
      "Tensor cache_positions, Tensor query_start, Tensor inv_freq, int n_global, int n_local, "
      "int distance_cap, float scale, Tensor? padding=None) -> Tensor");
  m.def(
      "lambda_attention_chunk_top_k(Tensor q, Tensor k, Tensor v, Tensor cache_k, "
      "Tensor cache_v, Tensor cache_positions, Tensor query_start, Tensor inv_freq, "
      "int n_global, int n_local, int distance_cap, float scale, Tensor middle_k, "
      "Tensor middle_v, Tensor middle_positions, int top_k, int top_k_distance, "
      "int top_k_first_row, Tensor? padding=None) -> Tensor");
  m.def(
      "ring_cache_append(Tensor(a!) cache_k, Tensor(b!) cache_v, Tensor(c!) cache_positions, "
      "Tensor k, Tensor v, Tensor start_position, int n_global, int n_local, "
      "Tensor? padding=None) -> ()");
  m.def("decode_linear(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(lminf, CPU, m) {
  m.impl("lambda_attention", &lambda_attention<attend_cpu>);
  m.impl("lambda_attention_chunk", &lambda_attention_chunk<attend_cpu>);
  m.impl("lambda_attention_chunk_top_k", &lambda_attention_chunk_top_k_cpu);
  m.impl("ring_cache_append", &ring_cache_append<append_cpu>);
  m.impl("decode_linear", &decode_linear_cpu);
}

}  // namespace lminf_ext
