// RoPE angles in float32 only, for loops that must not touch FP64 (the decode kernel's key loop).
#pragma once

#include "common.cuh"

namespace lminf::cuda {

// cos and sin of delta * inv_freq for a relative position delta, without double precision.
// The product is carried exactly as p + e (an fma two-product), reduced by pi/2 with a
// three-part constant (Cody-Waite, each step one fma, so the cancellation is exact), and the
// reduced argument goes through rope_sincos's polynomials. Within ~2e-7 of the exact values
// while |delta * inv_freq| < 1e5, i.e. for every distance a window of up to ~10^5 keys reaches
// (inv_freq <= 1). delta is a difference of positions, never an absolute one.
__device__ __forceinline__ void rope_sincos_f32(int delta, float inv_freq, float* cos_out,
                                                float* sin_out) {
  constexpr float kTwoOverPi = 0.636619772f;
  constexpr float kPiOver2A = 1.57079637e+00f;   // float(pi/2)
  constexpr float kPiOver2B = -4.37113883e-08f;  // float(pi/2 - A)
  constexpr float kPiOver2C = -1.71512451e-15f;  // float(pi/2 - A - B)
  const float d = static_cast<float>(delta);     // exact for |delta| < 2^24
  const float p = d * inv_freq;
  const float e = fmaf(d, inv_freq, -p);  // d * inv_freq == p + e exactly
  const float quadrant = rintf(p * kTwoOverPi);
  float x = fmaf(-quadrant, kPiOver2A, p);
  x = fmaf(-quadrant, kPiOver2B, x);
  x = fmaf(-quadrant, kPiOver2C, x);
  sincos_reduced(x + e, static_cast<int>(quadrant), cos_out, sin_out);
}

}  // namespace lminf::cuda
