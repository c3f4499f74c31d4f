// CUDA memory through the runtime API. Compiled only when CMake finds the CUDA toolkit.
#include <cuda_runtime_api.h>

#include "memory.h"

namespace lminf::detail {
namespace {

Status from_cuda(cudaError_t error, const char* what) {
  if (error == cudaSuccess) return Status::Ok();
  const StatusCode code =
      error == cudaErrorMemoryAllocation ? StatusCode::kOutOfMemory : StatusCode::kCudaError;
  return {code, std::string(what) + " failed: " + cudaGetErrorString(error)};
}

cudaStream_t as_stream(void* stream) { return static_cast<cudaStream_t>(stream); }

}  // namespace

Status cuda_allocate(size_t bytes, void** ptr) {
  return from_cuda(cudaMalloc(ptr, bytes), "cudaMalloc");
}

void cuda_deallocate(void* ptr) { cudaFree(ptr); }

Status cuda_fill_bytes(void* dst, unsigned char value, size_t bytes, void* stream) {
  return from_cuda(cudaMemsetAsync(dst, value, bytes, as_stream(stream)), "cudaMemsetAsync");
}

// From pageable host memory the runtime stages src into a pinned buffer before returning, which
// is what lets callers pass a temporary.
Status cuda_copy_from_host(void* dst, const void* src, size_t bytes, void* stream) {
  return from_cuda(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, as_stream(stream)),
                   "cudaMemcpyAsync");
}

Status cuda_synchronize(void* stream) {
  return from_cuda(cudaStreamSynchronize(as_stream(stream)), "cudaStreamSynchronize");
}

}  // namespace lminf::detail
