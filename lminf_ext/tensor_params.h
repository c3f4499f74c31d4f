// Turning torch tensors into the core's params structs, with argument checks that name the
// offending argument. Shared by the CPU and CUDA registrations.
#pragma once

#include <torch/types.h>

#include <optional>
#include <vector>

#include "lminf/decode_linear.h"
#include "lminf/lambda_attention.h"
#include "lminf/ring_kv_cache.h"

namespace lminf_ext {

// Tensors a LambdaAttentionParams points into; kept alive (and, where the caller's tensor was
// not usable as is, copied) for the duration of the kernel.
struct AttentionInputs {
  torch::Tensor q, k, v, cache_k, cache_v, cache_positions, query_start, padding, inv_freq, out;
  torch::Tensor middle_k, middle_v, middle_positions;
  lminf::LambdaAttentionParams params;
  lminf::TopKMiddleParams top_k;  // top_k == 0 unless attach_middle_store set it
};

AttentionInputs make_attention_inputs(const char* op, const torch::Tensor& q,
                                      const torch::Tensor& k, const torch::Tensor& v,
                                      const torch::Tensor& cache_k, const torch::Tensor& cache_v,
                                      const torch::Tensor& cache_positions,
                                      const torch::Tensor& query_start,
                                      const torch::Tensor& inv_freq, int64_t n_global,
                                      int64_t n_local, int64_t distance_cap, double scale,
                                      const std::optional<torch::Tensor>& padding);

// Adds the top-k middle store to `in` (in.top_k), after checking the tensors against the
// chunk's; the scalars' ranges are lminf::validate(params, top_k)'s.
void attach_middle_store(const char* op, AttentionInputs& in, const torch::Tensor& middle_k,
                         const torch::Tensor& middle_v, const torch::Tensor& middle_positions,
                         int64_t top_k, int64_t top_k_distance, int64_t top_k_first_row);

struct AppendInputs {
  torch::Tensor k, v, start_position, padding;
  lminf::RingCacheAppendParams params;
};

AppendInputs make_append_inputs(const torch::Tensor& cache_k, const torch::Tensor& cache_v,
                                const torch::Tensor& cache_positions, const torch::Tensor& k,
                                const torch::Tensor& v, const torch::Tensor& start_position,
                                int64_t n_global, int64_t n_local,
                                const std::optional<torch::Tensor>& padding);

struct LinearInputs {
  torch::Tensor x, weight, bias, out;  // x as [rows, in_features]; out [rows, out_features]
  std::vector<int64_t> out_shape;      // x's leading dimensions, then out_features
  lminf::DecodeLinearParams params;
};

// x [..., in_features], weight [out_features, in_features], bias [out_features] or none.
LinearInputs make_linear_inputs(const char* op, const torch::Tensor& x, const torch::Tensor& weight,
                                const std::optional<torch::Tensor>& bias);

// Raises a c10::Error carrying the core's message when status is not ok.
void check_status(const char* op, const lminf::Status& status);

}  // namespace lminf_ext
