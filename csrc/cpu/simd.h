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
inline float vreduce_sum(vfloat v) {
  float s = 0.f;
  for (int i = 0; i < kVecWidth; ++i) s += v[i];
  return s;
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
