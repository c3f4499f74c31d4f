// Row conversions between the storage types and float32, written as plain loops the
// compiler vectorises (bf16 is a shift; fp16 uses the hardware conversion where the target
// has one, e.g. F16C or AVX-512 FP16, and the exact scalar routine of dtype.h otherwise).
#pragma once

#include <cstdint>
#include <cstring>

#include "lminf/dtype.h"
#include "simd.h"

namespace lminf::cpu {

#if defined(__FLT16_MAX__)
#define LMINF_HAS_FLOAT16 1
#endif

inline void row_to_float(const float* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
}

inline void row_to_float(const bf16_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t bits = static_cast<uint32_t>(src[i].bits) << 16;
    std::memcpy(dst + i, &bits, sizeof bits);
  }
}

inline void row_to_float(const fp16_t* src, float* dst, int64_t n) {
#ifdef LMINF_HAS_FLOAT16
  const auto* half = reinterpret_cast<const _Float16*>(src);
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(half[i]);
#else
  for (int64_t i = 0; i < n; ++i) dst[i] = to_float(src[i]);
#endif
}

inline void row_from_float(const float* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
}

inline void row_from_float(const float* src, bf16_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = from_float<bf16_t>(src[i]);
}

inline void row_from_float(const float* src, fp16_t* dst, int64_t n) {
#ifdef LMINF_HAS_FLOAT16
  auto* half = reinterpret_cast<_Float16*>(dst);
  for (int64_t i = 0; i < n; ++i) half[i] = static_cast<_Float16>(src[i]);
#else
  for (int64_t i = 0; i < n; ++i) dst[i] = from_float<fp16_t>(src[i]);
#endif
}

// kVecWidth consecutive elements as one float32 vector (bf16: widen and shift, in registers;
// fp16: the hardware conversion where the target has one).
inline vfloat vload_float(const float* p) { return vload(p); }

inline vfloat vload_float(const bf16_t* p) {
  using vu16 = uint16_t __attribute__((vector_size(kVecWidth * sizeof(uint16_t))));
  vu16 bits;
  std::memcpy(&bits, p, sizeof bits);
  const vint wide = __builtin_convertvector(bits, vint) << 16;
  vfloat v;
  std::memcpy(&v, &wide, sizeof v);
  return v;
}

inline vfloat vload_float(const fp16_t* p) {
#ifdef LMINF_HAS_FLOAT16
  using vf16 = _Float16 __attribute__((vector_size(kVecWidth * sizeof(_Float16))));
  vf16 half;
  std::memcpy(&half, p, sizeof half);
  return __builtin_convertvector(half, vfloat);
#else
  float row[kVecWidth];
  row_to_float(p, row, kVecWidth);
  return vload(row);
#endif
}

}  // namespace lminf::cpu
