// Test data: host tensors in any lminf dtype, random contents, and tolerance checks.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "lminf/dtype.h"

namespace lminf_test {

// A flat host buffer of `size` elements stored in `dtype`.
class HostTensor {
 public:
  // NaN everywhere, so that an element a kernel forgets to write fails every comparison.
  HostTensor(lminf::DType dtype, size_t size);
  // The values rounded to dtype.
  HostTensor(lminf::DType dtype, const std::vector<float>& values);

  void* data() { return bytes_.data(); }
  const void* data() const { return bytes_.data(); }
  size_t size() const { return size_; }
  lminf::DType dtype() const { return dtype_; }
  // The stored values, exactly.
  std::vector<double> to_double() const;
  // A copy of elements [begin, begin + count) of each of `rows` consecutive blocks of
  // `row_length`: the slice [:, :, begin:begin+count] of a [rows, row_length, ...] tensor
  // when `row_length` and the range are counted in units of `unit` elements.
  HostTensor slice(size_t rows, size_t row_length, size_t begin, size_t count, size_t unit) const;
  // Writes `part` (shaped like the result of slice with the same arguments) back in place.
  void assign_slice(const HostTensor& part, size_t rows, size_t row_length, size_t begin,
                    size_t count, size_t unit);
  // Copies row src_row of src over row dst_row of this tensor, rows being row_size elements.
  void copy_row(const HostTensor& src, size_t src_row, size_t dst_row, size_t row_size);

 private:
  lminf::DType dtype_;
  size_t size_;
  std::vector<unsigned char> bytes_;
};

// `size` values uniform in [-1, 1], the same for the same seed.
std::vector<float> random_values(size_t size, uint64_t seed);

// The usual RoPE frequencies base^(-2f / rotary_dim), f < rotary_dim / 2.
std::vector<float> rope_inv_freq(int64_t rotary_dim, double base = 10000.0);

std::vector<double> to_double(const std::vector<float>& values);

// The largest |got - want| / (atol + rtol * |want|): <= 1 means every element is within
// tolerance. NaN anywhere gives infinity.
double worst_error_ratio(const std::vector<double>& got, const std::vector<double>& want,
                         double atol, double rtol);

// Absolute and relative tolerance for a kernel output in `dtype` against the float64 loop:
// float32 arithmetic throughout, then one rounding of the output to dtype.
struct Tolerance {
  double atol, rtol;
};
Tolerance tolerance_for(lminf::DType dtype);

}  // namespace lminf_test
