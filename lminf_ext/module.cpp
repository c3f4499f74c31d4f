// The Python module lm_infinite._C: importing it registers the ops (static initialisers in
// ops.cpp) and exposes what the build contains.
#include <torch/extension.h>

#include "lminf/version.h"
#include "op_impls.h"

namespace {

#define LMINF_STR_(x) #x
#define LMINF_STR(x) LMINF_STR_(x)

pybind11::dict build_info() {
  pybind11::dict info;
  info["version"] = LMINF_VERSION;
  pybind11::list backends;
  backends.append("cpu");
#ifdef LMINF_WITH_CUDA
  backends.append("cuda");
  info["cuda_version"] = LMINF_STR(LMINF_CUDA_VERSION);
  info["cuda_archs"] = LMINF_STR(LMINF_CUDA_ARCHS);
#endif
  // The sm_90a prefill kernel (csrc/cuda/hopper_prefill.cuh: LMINF_PREFILL_KERNEL picks it).
#ifdef LMINF_WITH_HOPPER_KERNEL
  info["hopper_prefill"] = true;
#else
  info["hopper_prefill"] = false;
#endif
#ifndef LMINF_WITH_CUDA
  info["cuda_version"] = pybind11::none();
  info["cuda_archs"] = pybind11::none();
#endif
  info["backends"] = backends;
#if defined(__clang__)
  info["compiler"] = "clang " __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = "gcc " __VERSION__;
#else
  info["compiler"] = "unknown";
#endif
#if defined(__AVX512F__)
  info["cpu_isa"] = "avx512";
#elif defined(__AVX2__)
  info["cpu_isa"] = "avx2";
#elif defined(__aarch64__)
  info["cpu_isa"] = "neon";
#else
  info["cpu_isa"] = "baseline";
#endif
  return info;
}

// The checks of lminf::lambda_attention_chunk_top_k (raising its errors), without running it:
// what its CUDA implementation, composed in Python (lm_infinite.ops), calls first.
void check_lambda_attention_chunk_top_k(
    const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
    const torch::Tensor& cache_k, const torch::Tensor& cache_v,
    const torch::Tensor& cache_positions, const torch::Tensor& query_start,
    const torch::Tensor& inv_freq, int64_t n_global, int64_t n_local, int64_t distance_cap,
    double scale, const torch::Tensor& middle_k, const torch::Tensor& middle_v,
    const torch::Tensor& middle_positions, int64_t top_k, int64_t top_k_distance,
    int64_t top_k_first_row, const std::optional<torch::Tensor>& padding) {
  lminf_ext::lambda_attention_chunk_top_k_inputs(
      q, k, v, cache_k, cache_v, cache_positions, query_start, inv_freq, n_global, n_local,
      distance_cap, scale, middle_k, middle_v, middle_positions, top_k, top_k_distance,
      top_k_first_row, padding);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "lm-infinite compiled extension: registers torch.ops.lminf";
  m.def("build_info", &build_info, "Version, compiled backends, compiler, CUDA version and archs");
  m.def("check_lambda_attention_chunk_top_k", &check_lambda_attention_chunk_top_k,
        "Raises lminf::lambda_attention_chunk_top_k's error for these arguments, if any");
}
