// The op schemas (defined once) and their CPU implementations.
#include <torch/library.h>

#include "op_impls.h"

namespace lminf_ext {
namespace {

void attend_cpu(const char* op, AttentionInputs& in) {
  check_status(op, lminf::lambda_attention_cpu(in.params));
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
      "int distance_cap, float scale, Tensor? middle_k=None, Tensor? middle_v=None, "
      "Tensor? middle_positions=None, int top_k=0, int top_k_distance=0, "
      "int top_k_first_row=0, Tensor? padding=None) -> Tensor");
  m.def(
      "ring_cache_append(Tensor(a!) cache_k, Tensor(b!) cache_v, Tensor(c!) cache_positions, "
      "Tensor k, Tensor v, Tensor start_position, int n_global, int n_local, "
      "Tensor? padding=None) -> ()");
  m.def("decode_linear(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(lminf, CPU, m) {
  m.impl("lambda_attention", &lambda_attention<attend_cpu>);
  m.impl("lambda_attention_chunk", &lambda_attention_chunk<attend_cpu>);
  m.impl("ring_cache_append", &ring_cache_append<append_cpu>);
  m.impl("decode_linear", &decode_linear_cpu);
}

}  // namespace lminf_ext
