// The ops' bodies, shared by every backend: check and convert the tensors, then hand the
// params to a backend's kernel launcher (a template argument, so each registration is a plain
// function with the schema's signature).
#pragma once

#include <optional>

#include "checks.h"
#include "tensor_params.h"

namespace lminf_ext {

using AttentionLauncher = void (*)(const char* op, AttentionInputs& inputs);
using AppendLauncher = void (*)(const char* op, AppendInputs& inputs);

template <AttentionLauncher launch>
torch::Tensor lambda_attention_chunk(const torch::Tensor& q, const torch::Tensor& k,
                                     const torch::Tensor& v, const torch::Tensor& cache_k,
                                     const torch::Tensor& cache_v,
                                     const torch::Tensor& cache_positions,
                                     const torch::Tensor& query_start,
                                     const torch::Tensor& inv_freq, int64_t n_global,
                                     int64_t n_local, int64_t distance_cap, double scale,
                                     const std::optional<torch::Tensor>& padding) {
  const char* op = "lminf::lambda_attention_chunk";
  AttentionInputs in = make_attention_inputs(op, q, k, v, cache_k, cache_v, cache_positions,
                                             query_start, inv_freq, n_global, n_local,
                                             distance_cap, scale, padding);
  launch(op, in);
  return in.out;
}

// lambda_attention_chunk_top_k's arguments, checked (the glue's structure checks and the core's
// validate) and converted: what its CPU kernel runs on, and what the Python composition that
// serves CUDA calls first (lm_infinite._C.check_lambda_attention_chunk_top_k), so both
// refuse the same inputs with the same messages.
inline AttentionInputs lambda_attention_chunk_top_k_inputs(
    const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
    const torch::Tensor& cache_k, const torch::Tensor& cache_v,
    const torch::Tensor& cache_positions, const torch::Tensor& query_start,
    const torch::Tensor& inv_freq, int64_t n_global, int64_t n_local, int64_t distance_cap,
    double scale, const torch::Tensor& middle_k, const torch::Tensor& middle_v,
    const torch::Tensor& middle_positions, int64_t top_k, int64_t top_k_distance,
    int64_t top_k_first_row, const std::optional<torch::Tensor>& padding) {
  const char* op = "lminf::lambda_attention_chunk_top_k";
  AttentionInputs in = make_attention_inputs(op, q, k, v, cache_k, cache_v, cache_positions,
                                             query_start, inv_freq, n_global, n_local,
                                             distance_cap, scale, padding);
  attach_middle_store(op, in, middle_k, middle_v, middle_positions, top_k, top_k_distance,
                      top_k_first_row);
  check_status(op, lminf::validate(in.params, in.top_k));
  return in;
}

template <AttentionLauncher launch>
torch::Tensor lambda_attention(const torch::Tensor& q, const torch::Tensor& k,
                               const torch::Tensor& v, const torch::Tensor& inv_freq,
                               int64_t n_global, int64_t n_local, int64_t distance_cap,
                               double scale, const std::optional<torch::Tensor>& padding) {
  const char* op = "lminf::lambda_attention";
  require(k.dim() == 4, op, [&] {
    return "k must be 4-D [batch, heads_kv, seq, head_dim], got shape " + shape_str(k);
  });
  // A whole sequence is a chunk at position 0 with an empty cache (each sequence's first real
  // row, after its padding, at position 0).
  const auto no_cache = k.new_empty({k.size(0), k.size(1), 0, k.size(3)});
  const auto no_positions = torch::empty({0}, k.options().dtype(torch::kInt64));
  const auto start = torch::zeros({1}, k.options().dtype(torch::kInt64));
  AttentionInputs in = make_attention_inputs(op, q, k, v, no_cache, no_cache, no_positions, start,
                                             inv_freq, n_global, n_local, distance_cap, scale,
                                             padding);
  launch(op, in);
  return in.out;
}

template <AppendLauncher launch>
void ring_cache_append(const torch::Tensor& cache_k, const torch::Tensor& cache_v,
                       const torch::Tensor& cache_positions, const torch::Tensor& k,
                       const torch::Tensor& v, const torch::Tensor& start_position,
                       int64_t n_global, int64_t n_local,
                       const std::optional<torch::Tensor>& padding) {
  AppendInputs in = make_append_inputs(cache_k, cache_v, cache_positions, k, v, start_position,
                                       n_global, n_local, padding);
  launch("lminf::ring_cache_append", in);
}

}  // namespace lminf_ext
