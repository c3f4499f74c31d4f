// Device helpers shared by the CUDA kernels: element types, accurate RoPE angles, and thin
// wrappers over the sm_80+ instructions the tensor-core kernel is built from (cp.async,
// ldmatrix, mma.sync). Torch-free.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "lminf/status.h"

namespace lminf::cuda {

// ---------------------------------------------------------------------------------------------
// Element types. Arithmetic is float32 everywhere; T is only how values are stored.

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <> __device__ __forceinline__ __half from_f32<__half>(float x) {
  return __float2half_rn(x);
}

// Two floats rounded to T and packed into one 32-bit register, `lo` in the low half (the
// element with the smaller column index in every mma fragment).
template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// The inverse of pack2: the low and high halves of a 32-bit register as floats.
template <typename T> __device__ __forceinline__ float2 unpack2(uint32_t bits);
template <> __device__ __forceinline__ float2 unpack2<__nv_bfloat16>(uint32_t bits) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&bits));
}
template <> __device__ __forceinline__ float2 unpack2<__half>(uint32_t bits) {
  return __half22float2(*reinterpret_cast<const __half2*>(&bits));
}

// ---------------------------------------------------------------------------------------------
// RoPE angles.
//
// The build uses --use_fast_math, which turns sincosf into the approximate __sinf/__cosf whose
// absolute error grows with the argument (roughly |x| * 2^-22). Rotations by up to n_local
// positions need better, so the reduction is done here explicitly: the angle delta * inv_freq
// is formed in double (exactly while |delta| < 2^29: its bits and the 24 of inv_freq fit in
// 53), reduced by pi/2 with a two-part constant, and the reduced argument (|r| <= pi/4) goes
// through single-precision minimax polynomials (Cephes sinf/cosf, ~1 ulp). The result is within
// ~1e-7 of the exact sin/cos for |delta| < 2^29 (and stays within a few 1e-7 well past 10^9),
// independent of compiler flags. delta is a relative position, never an absolute one.
// sin and cos of quadrant * pi/2 + x for a reduced argument |x| <= pi/4 (a little beyond is
// fine): single-precision minimax polynomials (Cephes sinf/cosf, ~1 ulp).
__device__ __forceinline__ void sincos_reduced(float x, int quadrant, float* cos_out,
                                               float* sin_out) {
  const float x2 = x * x;
  const float s = fmaf(x * x2, fmaf(x2, fmaf(x2, -1.9515295891e-4f, 8.3321608736e-3f),
                                    -1.6666654611e-1f), x);
  const float c = fmaf(x2 * x2, fmaf(x2, fmaf(x2, 2.443315711809948e-5f, -1.388731625493765e-3f),
                                     4.166664568298827e-2f), fmaf(-0.5f, x2, 1.0f));
  switch (quadrant & 3) {
    case 0: *sin_out = s; *cos_out = c; break;
    case 1: *sin_out = c; *cos_out = -s; break;
    case 2: *sin_out = -s; *cos_out = -c; break;
    default: *sin_out = -c; *cos_out = s; break;
  }
}

__device__ __forceinline__ void rope_sincos(int64_t delta, float inv_freq, float* cos_out,
                                            float* sin_out) {
  constexpr double kTwoOverPi = 0.63661977236758134308;
  constexpr double kPiOver2Hi = 1.5707963267948966;       // double(pi/2)
  constexpr double kPiOver2Lo = 6.123233995736766036e-17;  // pi/2 - kPiOver2Hi
  const double angle = static_cast<double>(delta) * static_cast<double>(inv_freq);  // exact
  const double quadrant = rint(angle * kTwoOverPi);
  double reduced = fma(-quadrant, kPiOver2Hi, angle);
  reduced = fma(-quadrant, kPiOver2Lo, reduced);
  sincos_reduced(static_cast<float>(reduced), static_cast<int>(static_cast<long long>(quadrant) & 3),
                 cos_out, sin_out);
}

// One rotate_half pair of a query row, as the prefill kernels keep it in shared memory: the
// packed word lo holds features (f, f + 1), hi their partners (f + half, f + half + 1). Rotated
// in place by the angles (c, s) of the two frequencies, and by (cap_c, cap_s), the angles of
// distance_cap, into cap_lo and cap_hi (R_D q, the global keys' query).
template <typename T>
__device__ __forceinline__ void rotate_query_pair(uint32_t* lo, uint32_t* hi, uint32_t* cap_lo,
                                                  uint32_t* cap_hi, const float (&c)[2],
                                                  const float (&s)[2], const float (&cap_c)[2],
                                                  const float (&cap_s)[2]) {
  const float2 x1 = unpack2<T>(*lo), x2 = unpack2<T>(*hi);
  *lo = pack2<T>(x1.x * c[0] - x2.x * s[0], x1.y * c[1] - x2.y * s[1]);
  *hi = pack2<T>(x2.x * c[0] + x1.x * s[0], x2.y * c[1] + x1.y * s[1]);
  *cap_lo = pack2<T>(x1.x * cap_c[0] - x2.x * cap_s[0], x1.y * cap_c[1] - x2.y * cap_s[1]);
  *cap_hi = pack2<T>(x2.x * cap_c[0] + x1.x * cap_s[0], x2.y * cap_c[1] + x1.y * cap_s[1]);
}

// ---------------------------------------------------------------------------------------------
// Asynchronous global -> shared copies (sm_80+). `valid == false` zero-fills the destination
// without reading the source (which must still be a mapped address: pass the tensor's base).

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem),
               "r"(src_bytes));
}

__device__ __forceinline__ void cp_async_8(void* smem, const void* gmem) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(dst), "l"(gmem));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int kPending> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

// ---------------------------------------------------------------------------------------------
// Tensor-core fragments. ldmatrix.x4 loads four 8x8 b16 matrices; lane l supplies the address
// of row (l % 8) of matrix (l / 8). mma m16n8k16 with float32 accumulation.

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// d += a * b for one 16x8x16 tile: a row-major 16x16, b column-major 16x8, d 16x8 float32.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                         uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4],
                                                  uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ---------------------------------------------------------------------------------------------
// Host side.

// Status for the last launch on this thread (cudaGetLastError clears it), naming the kernel.
inline Status launch_status(const char* kernel) {
  const cudaError_t error = cudaGetLastError();
  if (error == cudaSuccess) return Status::Ok();
  return Status(StatusCode::kCudaError,
                std::string(kernel) + " launch failed: " + cudaGetErrorString(error));
}

// Raises `kernel`'s dynamic shared-memory limit to `bytes` (above 48 KB a launch needs it).
// Not a stream operation, so it is allowed during graph capture.
template <typename Kernel>
Status allow_dynamic_smem(Kernel* kernel, size_t bytes, const char* who) {
  const cudaError_t error = cudaFuncSetAttribute(
      kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (error == cudaSuccess) return Status::Ok();
  return Status(StatusCode::kCudaError,
                std::string(who) + ": cudaFuncSetAttribute failed: " + cudaGetErrorString(error));
}

// Launches kernel<<<grid, threads, smem_bytes, stream>>>(args...), first raising the kernel's
// dynamic shared-memory limit to smem_bytes; the status names the kernel.
template <typename... Params, typename... Args>
Status launch_kernel(void (*kernel)(Params...), const char* name, dim3 grid, int threads,
                     size_t smem_bytes, cudaStream_t stream, const Args&... args) {
  const Status status = allow_dynamic_smem(kernel, smem_bytes, name);
  if (!status.ok()) return status;
  kernel<<<grid, threads, smem_bytes, stream>>>(args...);
  return launch_status(name);
}

// The value unchanged, but opaque to the optimiser: something computed once before a key loop
// (a per-sequence base pointer, a bound that depends on the sequence's padding) stays in its
// register instead of being re-derived from its parts on every tile.
template <typename T> __device__ __forceinline__ T* opaque(T* ptr) {
  asm("" : "+l"(ptr));
  return ptr;
}
__device__ __forceinline__ int opaque(int value) {
  asm("" : "+r"(value));
  return value;
}

inline bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

}  // namespace lminf::cuda
