// decode_linear_cpu against a float64 loop: every dtype, row counts on both sides of the
// kernel's register blocks, in_features with and without a vector tail, strided rows, with
// and without bias, any thread count; and bad arguments named in the error.
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "harness.h"
#include "host_tensor.h"
#include "lminf/decode_linear.h"

using lminf::DType;
using namespace lminf_test;

namespace {

struct Shape {
  int64_t rows, in_features, out_features;
  int64_t x_stride, weight_stride, out_stride;  // row strides, at least the row lengths
  bool bias;
};

std::string describe(const Shape& s, DType dtype) {
  return "rows=" + std::to_string(s.rows) + " in=" + std::to_string(s.in_features) +
         " out=" + std::to_string(s.out_features) + " strides=" + std::to_string(s.x_stride) +
         "/" + std::to_string(s.weight_stride) + "/" + std::to_string(s.out_stride) +
         (s.bias ? " bias" : "") + " dtype=" + lminf::dtype_name(dtype);
}

// The unit roundoff of a dtype: one rounding of a value to it errs by at most this, relatively.
double unit_roundoff(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return std::ldexp(1.0, -24);
    case DType::kBFloat16: return std::ldexp(1.0, -8);
    case DType::kFloat16: return std::ldexp(1.0, -11);
  }
  return 1.0;
}

struct Problem {
  Shape shape;
  DType dtype;
  HostTensor x, weight, bias, out;

  Problem(const Shape& s, DType d, uint64_t seed)
      : shape(s), dtype(d),
        x(d, random_values(std::max<int64_t>(s.rows, 1) * s.x_stride, seed)),
        weight(d, random_values(s.out_features * s.weight_stride, seed + 1)),
        bias(d, random_values(s.out_features, seed + 2)),
        out(d, static_cast<size_t>(std::max<int64_t>(s.rows, 1) * s.out_stride)) {}

  lminf::DecodeLinearParams params() {
    lminf::DecodeLinearParams p;
    p.dtype = dtype;
    p.x = {x.data(), shape.x_stride};
    p.weight = {weight.data(), shape.weight_stride};
    p.bias = shape.bias ? bias.data() : nullptr;
    p.out = {out.data(), shape.out_stride};
    p.rows = shape.rows, p.in_features = shape.in_features, p.out_features = shape.out_features;
    return p;
  }

  // Every output within float32 summation error (relative to the sum of |terms|) plus one
  // rounding to dtype of the exact value; elements between rows untouched (still NaN).
  void check(const std::string& what) const {
    const std::vector<double> xs = x.to_double(), ws = weight.to_double(), bs = bias.to_double();
    const std::vector<double> got = out.to_double();
    const double rounding = unit_roundoff(dtype);
    for (int64_t m = 0; m < shape.rows; ++m) {
      for (int64_t n = 0; n < shape.out_features; ++n) {
        double want = shape.bias ? bs[n] : 0.0, magnitude = std::fabs(want);
        for (int64_t k = 0; k < shape.in_features; ++k) {
          const double term = xs[m * shape.x_stride + k] * ws[n * shape.weight_stride + k];
          want += term;
          magnitude += std::fabs(term);
        }
        const double value = got[m * shape.out_stride + n];
        const double allowed = 1e-6 * magnitude + 1.01 * rounding * std::fabs(want) + 1e-30;
        if (!(std::fabs(value - want) <= allowed)) {
          CHECK(false) << what << " " << describe(shape, dtype) << ": out[" << m << "][" << n
                       << "] = " << value << ", want " << want;
          return;
        }
      }
      for (int64_t n = shape.out_features; n < shape.out_stride; ++n)
        CHECK(std::isnan(got[m * shape.out_stride + n]))
            << what << " wrote past out_features: " << describe(shape, dtype);
    }
  }
};

const std::vector<Shape> kShapes = {
    // rows, in, out, strides x/weight/out, bias
    {1, 576, 1536, 576, 576, 1536, false},  // SmolLM2's MLP up projection, one token
    {1, 64, 1, 64, 64, 1, true},            // one output feature
    {2, 577, 7, 577, 577, 7, true},         // a vector tail after whole vectors
    {3, 15, 9, 15, 15, 9, false},           // shorter than a vector
    {4, 128, 33, 130, 131, 40, true},       // strided rows
    {5, 100, 64, 100, 100, 64, true},       // one full block of rows of x, then one more
    {9, 48, 17, 50, 48, 20, false},         // two full blocks and one
    {0, 32, 8, 32, 32, 8, true},            // no rows: nothing to do
};

}  // namespace

TEST(decode_linear_matches_a_float64_loop) {
  uint64_t seed = 1;
  for (DType dtype : {DType::kFloat32, DType::kBFloat16, DType::kFloat16})
    for (const Shape& shape : kShapes) {
      Problem problem(shape, dtype, seed += 10);
      CHECK_OK(lminf::decode_linear_cpu(problem.params())) << describe(shape, dtype);
      problem.check("default threads");
    }
}

TEST(decode_linear_thread_count_does_not_change_the_result) {
  for (int threads : {1, 2, 3}) {
    Problem problem({3, 200, 301, 200, 200, 301, true}, DType::kBFloat16, 7);
    CHECK_OK(lminf::decode_linear_cpu(problem.params(), threads)) << threads << " threads";
    problem.check(std::to_string(threads) + " threads");
  }
}

TEST(decode_linear_bad_arguments_name_the_field) {
  struct BadCase {
    const char* names;
    void (*spoil)(lminf::DecodeLinearParams&);
  };
  const BadCase cases[] = {
      {"dtype", [](lminf::DecodeLinearParams& p) { p.dtype = static_cast<DType>(7); }},
      {"rows", [](lminf::DecodeLinearParams& p) { p.rows = -1; }},
      {"in_features", [](lminf::DecodeLinearParams& p) { p.in_features = 0; }},
      {"out_features", [](lminf::DecodeLinearParams& p) { p.out_features = 0; }},
      {"x.row_stride", [](lminf::DecodeLinearParams& p) { p.x.row_stride = p.in_features - 1; }},
      {"weight.row_stride", [](lminf::DecodeLinearParams& p) { p.weight.row_stride = 3; }},
      {"out.row_stride", [](lminf::DecodeLinearParams& p) { p.out.row_stride = 1; }},
      {"weight", [](lminf::DecodeLinearParams& p) { p.weight.data = nullptr; }},
      {"x and out", [](lminf::DecodeLinearParams& p) { p.out.data = nullptr; }},
  };
  for (const BadCase& bad : cases) {
    Problem problem({2, 16, 4, 16, 16, 4, true}, DType::kFloat32, 3);
    lminf::DecodeLinearParams p = problem.params();
    bad.spoil(p);
    const lminf::Status status = lminf::decode_linear_cpu(p);
    CHECK(status.code() == lminf::StatusCode::kInvalidArgument) << bad.names << ": " << status.message();
    CHECK(status.message().find(bad.names) != std::string::npos)
        << "message '" << status.message() << "' does not name " << bad.names;
    for (double value : problem.out.to_double()) CHECK(std::isnan(value)) << bad.names << " wrote the output";
  }
}
