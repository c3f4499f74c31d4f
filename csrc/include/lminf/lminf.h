// lminf: LM-Infinite attention for C++ inference pipelines. Include this one header for the
// whole public API:
//   status.h            Status, the error type every entry point returns (nothing throws)
//   dtype.h             element types (float32, bfloat16, float16)
//   limits.h            the largest size or position accepted (2^62)
//   strided_view.h      StridedView, RowsView, PerSequence: the tensors of every params struct
//   decode_linear.h     x W^T for the few rows of a decode step (CPU)
//   lambda_attention.h  Λ-attention kernels over raw strided pointers (CPU and CUDA)
//   ring_kv_cache.h     the ring-buffer cache layout and its append kernels
//   kv_cache.h          KVCache: one layer's cache with append, chunk attention and decode
//   version.h           LMINF_VERSION and its parts
#pragma once

#include "lminf/decode_linear.h"
#include "lminf/dtype.h"
#include "lminf/kv_cache.h"
#include "lminf/lambda_attention.h"
#include "lminf/limits.h"
#include "lminf/ring_kv_cache.h"
#include "lminf/status.h"
#include "lminf/strided_view.h"
#include "lminf/version.h"
