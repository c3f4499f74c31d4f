// LMINF_HOST_DEVICE: marks the small inline functions of the public headers (strided views,
// the Λ mask) that the CPU kernels and the CUDA kernels share, so that both compile the one
// definition: __host__ __device__ under nvcc, a plain inline function elsewhere.
#pragma once

#if defined(__CUDACC__)
#define LMINF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LMINF_HOST_DEVICE inline
#endif
