// Combines the split-key partial results of the tensor-core kernel (flash-decoding).
//
// Each split z of an output row left its output normalised by its own softmax sum, O_z, and
// lse_z = log2 of that sum (in the kernel's exp2 domain, max included). The row's output is
//   sum_z 2^(lse_z - lse) O_z,  lse = log2 sum_z 2^lse_z,
// computed stably against max_z lse_z. Splits that saw no key carry lse_z = -inf, weight 0.
// One warp per output row; lanes stride over the splits, then over the columns.
#include <cuda_runtime.h>

#include "common.cuh"
#include "lambda_attention_plan.cuh"
#include "softmax.cuh"

namespace lminf::cuda {
namespace {

constexpr int kWarpsPerBlock = 4;

template <typename T>
__global__ void __launch_bounds__(32 * kWarpsPerBlock)
    lse_merge_kernel(const LambdaAttentionParams p, int64_t n_splits,
                     const float* __restrict__ partial_out, const float* __restrict__ partial_lse) {
  const int lane = threadIdx.x % 32;
  const int64_t row = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int64_t n_rows = p.batch * p.n_heads_q * p.n_queries;
  if (row >= n_rows) return;
  const int64_t t = row % p.n_queries;
  const int64_t head = row / p.n_queries % p.n_heads_q;
  const int64_t b = row / (p.n_queries * p.n_heads_q);
  const float* lse = partial_lse + row * n_splits;
  const float* out_z = partial_out + row * n_splits * p.head_dim;

  float lse_max = -INFINITY;
  for (int64_t z = lane; z < n_splits; z += 32) lse_max = fmaxf(lse_max, lse[z]);
  for (int offset = 16; offset > 0; offset /= 2)
    lse_max = fmaxf(lse_max, __shfl_xor_sync(0xffffffffu, lse_max, offset));
  const float ref = softmax_reference(lse_max, 1.f);  // log2-sum-exps: already scaled
  float total = 0.f;
  for (int64_t z = lane; z < n_splits; z += 32) total += exp2f(lse[z] - ref);
  for (int offset = 16; offset > 0; offset /= 2)
    total += __shfl_xor_sync(0xffffffffu, total, offset);
  const float inv_total = inverse_or_zero(total);

  T* out = p.out.as<T>().at(b, head, t);
  for (int64_t col = lane; col < p.head_dim; col += 32) {
    float acc = 0.f;
    for (int64_t z = 0; z < n_splits; ++z) acc += exp2f(lse[z] - ref) * out_z[z * p.head_dim + col];
    out[col] = from_f32<T>(acc * inv_total);
  }
}

template <typename T>
Status launch(const LambdaAttentionParams& p, const AttentionPlan& plan, const void* workspace,
              cudaStream_t stream) {
  const int64_t n_rows = p.batch * p.n_heads_q * p.n_queries;
  const auto* partial_out = static_cast<const float*>(workspace);
  const auto* partial_lse = reinterpret_cast<const float*>(
      static_cast<const char*>(workspace) + plan.partial_lse_offset);
  const auto blocks = static_cast<unsigned>((n_rows + kWarpsPerBlock - 1) / kWarpsPerBlock);
  lse_merge_kernel<T><<<blocks, 32 * kWarpsPerBlock, 0, stream>>>(p, plan.n_splits, partial_out,
                                                                   partial_lse);
  return launch_status("lse_merge_kernel");
}

}  // namespace

Status launch_lse_merge(const LambdaAttentionParams& params, const AttentionPlan& plan,
                        const void* workspace, cudaStream_t stream) {
  switch (params.dtype) {
    case DType::kBFloat16: return launch<__nv_bfloat16>(params, plan, workspace, stream);
    case DType::kFloat16: return launch<__half>(params, plan, workspace, stream);
    default: return launch<float>(params, plan, workspace, stream);
  }
}

}  // namespace lminf::cuda
