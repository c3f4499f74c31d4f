// Linear layers of a decode step on the CPU: out = x W^T (+ bias) for a few rows of x.
//
// A decode step multiplies one token's activations per sequence (a few rows) by every weight
// matrix of the model, so reading the weights is the whole cost. GEMM libraries tile for many
// rows and run this shape far below the memory bandwidth (PyTorch's CPU linear with one row:
// about 9 GB/s where the same core streams 24, and it leaves the other cores idle). Here the
// threads split the output features, each streams its share of W once, and every row of x is
// applied to a block of W while that block is in L1. Products are summed in float32.
#pragma once

#include <cstdint>

#include "lminf/dtype.h"
#include "lminf/export.h"
#include "lminf/status.h"
#include "lminf/strided_view.h"

namespace lminf {

// Matrices are row views (strided_view.h: row strides in elements, each row contiguous).
struct DecodeLinearParams {
  DType dtype = DType::kFloat32;  // element type of x, weight, bias and out

  RowsView<const void> x;       // [rows, in_features]
  RowsView<const void> weight;  // [out_features, in_features]
  const void* bias = nullptr;   // [out_features] contiguous, or null for none
  RowsView<void> out;           // [rows, out_features], written in dtype (float32 rounded once)

  int64_t rows = 0;  // >= 0; up to 4 (AVX2; 8 with 32 vector registers) share each read of W
  int64_t in_features = 0;
  int64_t out_features = 0;
};

// Checks sizes, strides and pointers; the message names the first offending field.
LMINF_API Status validate(const DecodeLinearParams& params);

// n_threads <= 0 uses the OpenMP default. Any number of rows is computed correctly, and each
// row's result is the same whatever the other rows (the order of its sum is fixed). Past a
// few rows a GEMM library with a native kernel for the dtype is faster (each row costs a load
// of x per multiply-add here).
LMINF_API Status decode_linear_cpu(const DecodeLinearParams& params, int n_threads = 0);

}  // namespace lminf
