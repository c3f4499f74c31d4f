// CUDA implementations of the ops: the kernels run on the current stream of the inputs'
// device, with scratch from PyTorch's caching allocator (graph-capture safe).
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "checks.h"
#include "op_impls.h"

namespace lminf_ext {
namespace {

void attend_cuda(const char* op, AttentionInputs& in) {
  // The workspace is sized from the params, so they are checked before it is allocated.
  check_status(op, lminf::validate(in.params));
  const c10::cuda::CUDAGuard guard(in.q.device());
  const auto bytes = static_cast<int64_t>(lminf::lambda_attention_cuda_workspace_size(in.params));
  torch::Tensor workspace = torch::empty({bytes}, in.q.options().dtype(torch::kUInt8));
  check_status(op, lminf::lambda_attention_cuda(in.params, workspace.data_ptr(),
                                                c10::cuda::getCurrentCUDAStream().stream()));
}

void append_cuda(const char* op, AppendInputs& in) {
  const c10::cuda::CUDAGuard guard(in.k.device());
  check_status(op, lminf::ring_cache_append_cuda(in.params, c10::cuda::getCurrentCUDAStream().stream()));
}

}  // namespace

// lambda_attention_chunk_top_k has no CUDA kernel here: lm_infinite.ops registers its CUDA
// implementation (the plain kernel, then PyTorch ops for the top-k rows).
TORCH_LIBRARY_IMPL(lminf, CUDA, m) {
  m.impl("lambda_attention", &lambda_attention<attend_cuda>);
  m.impl("lambda_attention_chunk", &lambda_attention_chunk<attend_cuda>);
  m.impl("ring_cache_append", &ring_cache_append<append_cuda>);
}

}  // namespace lminf_ext
