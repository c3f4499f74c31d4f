#include "host_tensor.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <random>

namespace lminf_test {
namespace {

double element(const unsigned char* bytes, lminf::DType dtype, size_t i) {
  switch (dtype) {
    case lminf::DType::kFloat32: {
      float x;
      std::memcpy(&x, bytes + 4 * i, 4);
      return x;
    }
    case lminf::DType::kBFloat16: {
      lminf::bf16_t x;
      std::memcpy(&x, bytes + 2 * i, 2);
      return lminf::to_float(x);
    }
    case lminf::DType::kFloat16: {
      lminf::fp16_t x;
      std::memcpy(&x, bytes + 2 * i, 2);
      return lminf::to_float(x);
    }
  }
  return std::numeric_limits<double>::quiet_NaN();
}

void store(unsigned char* bytes, lminf::DType dtype, size_t i, float value) {
  switch (dtype) {
    case lminf::DType::kFloat32:
      std::memcpy(bytes + 4 * i, &value, 4);
      return;
    case lminf::DType::kBFloat16: {
      const lminf::bf16_t x = lminf::from_float<lminf::bf16_t>(value);
      std::memcpy(bytes + 2 * i, &x, 2);
      return;
    }
    case lminf::DType::kFloat16: {
      const lminf::fp16_t x = lminf::from_float<lminf::fp16_t>(value);
      std::memcpy(bytes + 2 * i, &x, 2);
      return;
    }
  }
}

}  // namespace

HostTensor::HostTensor(lminf::DType dtype, size_t size)
    : dtype_(dtype), size_(size), bytes_(size * lminf::dtype_size(dtype)) {
  for (size_t i = 0; i < size; ++i)
    store(bytes_.data(), dtype, i, std::numeric_limits<float>::quiet_NaN());
}

HostTensor::HostTensor(lminf::DType dtype, const std::vector<float>& values)
    : dtype_(dtype), size_(values.size()), bytes_(values.size() * lminf::dtype_size(dtype)) {
  for (size_t i = 0; i < size_; ++i) store(bytes_.data(), dtype, i, values[i]);
}

std::vector<double> HostTensor::to_double() const {
  std::vector<double> values(size_);
  for (size_t i = 0; i < size_; ++i) values[i] = element(bytes_.data(), dtype_, i);
  return values;
}

HostTensor HostTensor::slice(size_t rows, size_t row_length, size_t begin, size_t count,
                             size_t unit) const {
  HostTensor part(dtype_, rows * count * unit);
  const size_t width = lminf::dtype_size(dtype_) * unit;
  for (size_t r = 0; r < rows; ++r) {
    std::memcpy(part.bytes_.data() + r * count * width,
                bytes_.data() + (r * row_length + begin) * width, count * width);
  }
  return part;
}

void HostTensor::assign_slice(const HostTensor& part, size_t rows, size_t row_length, size_t begin,
                              size_t count, size_t unit) {
  const size_t width = lminf::dtype_size(dtype_) * unit;
  for (size_t r = 0; r < rows; ++r) {
    std::memcpy(bytes_.data() + (r * row_length + begin) * width,
                part.bytes_.data() + r * count * width, count * width);
  }
}

void HostTensor::copy_row(const HostTensor& src, size_t src_row, size_t dst_row, size_t row_size) {
  const size_t width = lminf::dtype_size(dtype_) * row_size;
  std::memcpy(bytes_.data() + dst_row * width, src.bytes_.data() + src_row * width, width);
}

std::vector<float> random_values(size_t size, uint64_t seed) {
  std::mt19937_64 generator(seed);
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  std::vector<float> values(size);
  for (float& x : values) x = uniform(generator);
  return values;
}

std::vector<float> rope_inv_freq(int64_t rotary_dim, double base) {
  std::vector<float> inv_freq(rotary_dim / 2);
  for (int64_t f = 0; f < rotary_dim / 2; ++f) {
    inv_freq[f] = static_cast<float>(std::pow(base, -2.0 * f / rotary_dim));
  }
  return inv_freq;
}

std::vector<double> to_double(const std::vector<float>& values) {
  return {values.begin(), values.end()};
}

double worst_error_ratio(const std::vector<double>& got, const std::vector<double>& want,
                         double atol, double rtol) {
  if (got.size() != want.size()) return std::numeric_limits<double>::infinity();
  double worst = 0.0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double ratio = std::abs(got[i] - want[i]) / (atol + rtol * std::abs(want[i]));
    if (!(ratio <= worst))
      worst = std::isnan(ratio) ? std::numeric_limits<double>::infinity() : ratio;
  }
  return worst;
}

Tolerance tolerance_for(lminf::DType dtype) {
  switch (dtype) {
    case lminf::DType::kFloat32:
      return {2e-6, 1e-5};
    case lminf::DType::kBFloat16:
      return {1e-3, 8e-3};  // one bf16 rounding: 2^-8 relative
    case lminf::DType::kFloat16:
      return {2e-4, 1e-3};  // one fp16 rounding: 2^-11 relative
  }
  return {0.0, 0.0};
}

}  // namespace lminf_test
