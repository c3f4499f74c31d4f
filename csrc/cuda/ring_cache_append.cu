// ring_cache_append_cuda: writes a chunk of keys/values into the ring-buffer cache.
//
// Sequence b's real rows are t >= pad = padding[b] (0 without padding); row t is the token at
// position p = start + (t - pad), start = *start_position.of(b), and
// goes to slot ring_slot(p) of sequence b's cache (its own row of cache_positions, or the
// shared row). Padding rows are never written. Only the tokens that survive the chunk are
// copied: those at p < n_global, and the last n_local (an earlier token with p >= n_global
// shares its slot with the token n_local later). Survivors occupy distinct slots, so blocks
// never race. The grid is sized from the bound n_global + n_local on survivors (starts and
// padding live on the device); block x maps to the x-th survivor of its sequence or exits.
//
// One block per (survivor, kv head, batch row): a row of head_dim elements, in 16-byte words
// when every row is 16-byte aligned, element by element otherwise. Block (x, 0, b) also writes
// the slot's position (only b == 0 when the batch shares one positions row).
#include <cuda_runtime.h>

#include <string>

#include "common.cuh"
#include "lminf/ring_kv_cache.h"

namespace lminf::cuda {
namespace {

constexpr int kThreads = 64;

// Word: uint4 (16-byte copies) or the element's own width (uint16_t / uint32_t). Strides and
// head_dim are in elements; kElemsPerWord elements make one Word.
template <typename Word, int kElemsPerWord>
__global__ void __launch_bounds__(kThreads) ring_cache_append_kernel(const RingCacheAppendParams p,
                                                                     int element_bytes) {
  const int64_t b = blockIdx.z, head = blockIdx.y;
  // The sequence's start and padding: one read per block (stride 0 / null: shared, none).
  const int64_t start = *p.start_position.of(b);
  const int64_t pad = p.padding != nullptr ? p.padding[b] : 0;
  const int64_t n_real = p.n_new - pad, n_global = p.n_global, n_local = p.n_local;
  // Survivors among the real rows t' = t - pad: t' in [0, n_prefix) (global positions), then
  // t' in [suffix_begin, n_real).
  const int64_t n_prefix = max64(0, min64(n_global - start, n_real));
  const int64_t suffix_begin = max64(n_prefix, n_real - n_local);
  const int64_t index = blockIdx.x;
  const int64_t real_row = index < n_prefix ? index : suffix_begin + (index - n_prefix);
  if (real_row >= n_real) return;
  const int64_t position = start + real_row;
  const int64_t t = pad + real_row;  // the row in k and v
  const int64_t slot = ring_slot(position, n_global, n_local);
  if ((b == 0 || p.cache_positions.batch_stride != 0) && head == 0 && threadIdx.x == 0)
    p.cache_positions.of(b)[slot] = position;

  // Byte addresses: the kernel copies words, whatever the element type.
  const auto* k_src = static_cast<const char*>(p.k.data) + p.k.offset(b, head, t) * element_bytes;
  const auto* v_src = static_cast<const char*>(p.v.data) + p.v.offset(b, head, t) * element_bytes;
  auto* k_dst = static_cast<char*>(p.cache_k.data) +
                p.cache_k.offset(b, head, slot) * element_bytes;
  auto* v_dst = static_cast<char*>(p.cache_v.data) +
                p.cache_v.offset(b, head, slot) * element_bytes;
  const int64_t n_words = p.head_dim / kElemsPerWord;
  // A row is at most a few iterations; unrolling only made ptxas spill around the 64-bit
  // remainder above.
#pragma unroll 1
  for (int64_t w = threadIdx.x; w < n_words; w += kThreads) {
    reinterpret_cast<Word*>(k_dst)[w] = reinterpret_cast<const Word*>(k_src)[w];
    reinterpret_cast<Word*>(v_dst)[w] = reinterpret_cast<const Word*>(v_src)[w];
  }
}

bool rows_16_byte_aligned(const RingCacheAppendParams& p, int element_bytes) {
  const int64_t per_word = 16 / element_bytes;
  for (int64_t stride : {p.k.batch_stride, p.k.head_stride, p.k.row_stride, p.v.batch_stride,
                         p.v.head_stride, p.v.row_stride, p.cache_k.batch_stride,
                         p.cache_k.head_stride, p.cache_k.row_stride, p.cache_v.batch_stride,
                         p.cache_v.head_stride, p.cache_v.row_stride, p.head_dim})
    if (stride % per_word != 0) return false;
  return aligned16(p.k.data) && aligned16(p.v.data) && aligned16(p.cache_k.data) &&
         aligned16(p.cache_v.data);
}

}  // namespace
}  // namespace lminf::cuda

namespace lminf {

Status ring_cache_append_cuda(const RingCacheAppendParams& params, void* stream) {
  const Status status = validate(params);
  if (!status.ok()) return status;
  if (params.n_new == 0 || params.batch == 0) return Status::Ok();
  if (params.n_heads_kv > 65535 || params.batch > 65535)
    return Status::Unsupported("ring_cache_append_cuda: batch=" + std::to_string(params.batch) +
                               " and n_heads_kv=" + std::to_string(params.n_heads_kv) +
                               " must each be at most 65535");
  // Every token could survive when the chunk is short; never more than the cache holds.
  const int64_t max_survivors = cuda::min64(params.n_new, params.n_global + params.n_local);
  const dim3 grid(static_cast<unsigned>(max_survivors), static_cast<unsigned>(params.n_heads_kv),
                  static_cast<unsigned>(params.batch));
  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  const int element_bytes = dtype_size(params.dtype);
  using cuda::kThreads;
  using cuda::ring_cache_append_kernel;
  if (cuda::rows_16_byte_aligned(params, element_bytes)) {
    if (element_bytes == 2)
      ring_cache_append_kernel<uint4, 8><<<grid, kThreads, 0, cuda_stream>>>(params, 2);
    else
      ring_cache_append_kernel<uint4, 4><<<grid, kThreads, 0, cuda_stream>>>(params, 4);
  } else if (element_bytes == 2) {
    ring_cache_append_kernel<uint16_t, 1><<<grid, kThreads, 0, cuda_stream>>>(params, 2);
  } else {
    ring_cache_append_kernel<uint32_t, 1><<<grid, kThreads, 0, cuda_stream>>>(params, 4);
  }
  return cuda::launch_status("ring_cache_append_kernel");
}

}  // namespace lminf
