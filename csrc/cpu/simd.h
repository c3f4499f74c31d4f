// Portable SIMD for the CPU kernels, built on GCC/Clang vector extensions: the same source
// becomes AVX-512, AVX2, NEON or SSE code depending on the target the core is compiled for
// (setup.py and CMake pass -march=native unless told otherwise).
#pragma once

#include <cstdint>
#include <cstring>

namespace lminf::cpu {

#if defined(__AVX512F__)
inline constexpr int kVecWidth = 16;       // floats per vector register
inline constexpr int kVecRegisters = 32;
#elif defined(__AVX2__)
inline constexpr int kVecWidth = 8;
inline constexpr int kVecRegisters = 16;
#elif defined(__ARM_NEON) || defined(__aarch64__)
inline constexpr int kVecWidth = 4;
inline constexpr int kVecRegisters = 32;
#else
inline constexpr int kVecWidth = 4;
inline constexpr int kVecRegisters = 16;
#endif

using vfloat = float __attribute__((vector_size(kVecWidth * sizeof(float))));
using vint = int32_t __attribute__((vector_size(kVecWidth * sizeof(int32_t))));

inline vfloat vbroadcast(float x) { return vfloat{} + x; }

// Loads and stores through memcpy: legal for any alignment, compiled to one vector move.
inline vfloat vload(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void vstore(float* p, vfloat v) { std::memcpy(p, &v, sizeof v); }

inline float vreduce_max(vfloat v) {
  float m = v[0];
  for (int i = 1; i < kVecWidth; ++i) m = v[i] > m ? v[i] : m;
  return m;
}
// Pairwise: the vector is folded in halves, log2(kVecWidth) vector adds instead of a chain of
// kVecWidth dependent scalar ones (the decode path sums one such vector per key and row). The
// halves are built from lanes (register shuffles), not copied out with memcpy: that made GCC
// keep the vector, and the accumulator of every loop that feeds it, in memory (a store-to-load
// round trip per step of the loop).
namespace simd_detail {
using v4f = float __attribute__((vector_size(4 * sizeof(float))));
using v8f = float __attribute__((vector_size(8 * sizeof(float))));
using v16f = float __attribute__((vector_size(16 * sizeof(float))));
inline float sum(v4f v) { return (v[0] + v[2]) + (v[1] + v[3]); }
inline float sum(v8f v) { return sum(v4f{v[0], v[1], v[2], v[3]} + v4f{v[4], v[5], v[6], v[7]}); }
inline float sum(v16f v) {
  return sum(v8f{v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]} +
             v8f{v[8], v[9], v[10], v[11], v[12], v[13], v[14], v[15]});
}
}  // namespace simd_detail
inline float vreduce_sum(vfloat v) { return simd_detail::sum(v); }

// True when none of x[0..n) is NaN or infinite (n a multiple of kVecWidth): x * 0 is 0 for
// finite x and NaN otherwise. No early exit, so the loop stays a few vector multiply-adds;
// the decode path runs it on every value it reads.
inline bool vall_finite(const float* x, int64_t n) {
  vfloat zero_if_finite = {};
  for (int64_t i = 0; i < n; i += kVecWidth) zero_if_finite += vload(x + i) * 0.f;
  return vreduce_sum(zero_if_finite) == 0.f;
}

// exp(x) for x <= 0 (softmax arguments are scores minus the row maximum), to about 1 ulp:
// Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, then the Cephes minimax polynomial for
// e^r. Inputs below -87 (where e^x leaves the normal range) return tiny values, not 0:
// callers zero masked entries themselves.
inline vfloat vexp_nonpositive(vfloat x) {
  x = x < -87.0f ? vbroadcast(-87.0f) : x;
  const vfloat t = x * 1.44269504088896341f - 0.5f;  // round to nearest for t <= 0.5
  const vint n = __builtin_convertvector(t, vint);  // truncation toward zero
  const vfloat nf = __builtin_convertvector(n, vfloat);
  const vfloat r = x - nf * 0.693359375f - nf * -2.12194440e-4f;
  vfloat p = vbroadcast(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const vint two_n = (n + 127) << 23;
  vfloat scale;
  std::memcpy(&scale, &two_n, sizeof scale);
  return p * scale;
}

}  // namespace lminf::cpu
