// cos/sin of p * inv_freq[f] for the small relative offsets p the CPU kernel rotates by.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <algorithm>
#include <memory>
#include <mutex>
#include <vector>

namespace lminf::cpu {

// Row p holds cos (resp. sin) of p * inv_freq[f] for f < half, rounded once from double.
// Exact sincos every kRestart rows and one double complex multiply in between keep every
// entry within a few 1e-16 of the true value while calling sincos 1/kRestart as often.
struct RopeTable {
  int64_t half = 0;
  std::vector<float> cos, sin;  // [rows][half]

  RopeTable(const float* inv_freq, int64_t half_dim, int64_t rows) : half(half_dim) {
    constexpr int64_t kRestart = 64;
    // rows follows n_local and the stream position: a product that wraps would allocate a
    // small table and read past it. Callers turn this into an out-of-memory Status.
    if (half > 0 && rows > std::numeric_limits<int64_t>::max() / half)
      throw std::length_error("lminf: rotary table size overflows int64");
    cos.resize(rows * half);
    sin.resize(rows * half);
    std::vector<double> step_cos(kRestart * half), step_sin(kRestart * half);
    for (int64_t k = 0; k < kRestart; ++k)
      for (int64_t f = 0; f < half; ++f) {
        const double angle = static_cast<double>(k) * inv_freq[f];
        step_cos[k * half + f] = std::cos(angle);
        step_sin[k * half + f] = std::sin(angle);
      }
    for (int64_t start = 0; start < rows; start += kRestart)
      for (int64_t f = 0; f < half; ++f) {
        const double angle = static_cast<double>(start) * inv_freq[f];
        const double c0 = std::cos(angle), s0 = std::sin(angle);
        for (int64_t k = 0; k < kRestart && start + k < rows; ++k) {
          const double ck = step_cos[k * half + f], sk = step_sin[k * half + f];
          cos[(start + k) * half + f] = static_cast<float>(c0 * ck - s0 * sk);
          sin[(start + k) * half + f] = static_cast<float>(s0 * ck + c0 * sk);
        }
      }
  }

  const float* cos_row(int64_t p) const { return cos.data() + p * half; }
  const float* sin_row(int64_t p) const { return sin.data() + p * half; }
  int64_t rows() const { return half == 0 ? 0 : static_cast<int64_t>(cos.size()) / half; }
};

// The table for (inv_freq, at least `rows` rows), reused across calls: every layer of a
// model shares one inv_freq, so a decode step would otherwise rebuild the same table per
// layer, which costs more than the attention itself. One entry, guarded by a mutex; callers
// hold a shared_ptr, so replacing the entry never frees a table in use.
inline std::shared_ptr<const RopeTable> shared_rope_table(const float* inv_freq, int64_t half,
                                                          int64_t rows) {
  static std::mutex mutex;
  static std::shared_ptr<const RopeTable> cached;
  static std::vector<float> cached_freq;
  std::lock_guard<std::mutex> lock(mutex);
  const bool same_freq = static_cast<int64_t>(cached_freq.size()) == half &&
                         (half == 0 || std::memcmp(cached_freq.data(), inv_freq, half * sizeof(float)) == 0);
  if (cached && same_freq && cached->rows() >= rows) return cached;
  // Grow geometrically so a stream whose chunks vary in size rebuilds only a few times.
  const int64_t new_rows = same_freq && cached ? std::max(rows, 2 * cached->rows()) : rows;
  cached = std::make_shared<const RopeTable>(inv_freq, half, new_rows);
  cached_freq.assign(inv_freq, inv_freq + half);
  return cached;
}

// Hugging Face's rotate_half convention on the first 2*half features of x, in place:
// (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin).
inline void rotate_half_inplace(float* x, const float* cos, const float* sin, int64_t half) {
  for (int64_t f = 0; f < half; ++f) {
    const float x1 = x[f], x2 = x[half + f];
    x[f] = x1 * cos[f] - x2 * sin[f];
    x[half + f] = x2 * cos[f] + x1 * sin[f];
  }
}

}  // namespace lminf::cpu
