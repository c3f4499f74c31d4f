// Λ-attention for what the tensor-core kernel does not take: float32, head_dim other than 64
// and 128 (up to 256), rows not 16-byte aligned. Correct and simple rather than fast: CUDA
// cores, float32 throughout, shared-memory tiles of 16 queries x 16 keys.
//
// Same semantics and the same relative RoPE as the tensor-core kernel: the block anchors at
// q0, the position of its first query; queries are rotated by t - t0 (< 16), keys in the
// block's window by j - q0 (> -n_local), global keys stay unrotated and meet R_D q.
// Batches: a sequence's start, padding and cache-position row are read once per block; its
// chunk keys are its real rows only (padding rows are no keys and output zeros).
// Per tile: load and convert keys/values, rotate, score every (query, key) pair, online softmax
// per row, O += P V. Barriers separate the steps; one block of 128 threads per 16 queries.
#include <cuda_runtime.h>

#include <cmath>
#include <string>

#include "common.cuh"
#include "lambda_attention_plan.cuh"
#include "lminf/lambda_mask.h"
#include "softmax.cuh"
#include "tile_list.cuh"

namespace lminf::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kRows = 16;  // queries per block
constexpr int kKeys = 16;  // keys per tile

// Shared-memory rows are head_dim + 1 floats: threads scoring different keys of one row then
// read different banks.
struct GenericSmem {
  int64_t stride;  // floats per row
  float *q_local, *q_cap, *k_rot, *k_raw, *v, *out, *prob, *row_max, *row_sum, *correction;
  int64_t* pos;

  __device__ GenericSmem(float* base, int64_t head_dim) : stride(head_dim + 1) {
    q_local = base;
    q_cap = q_local + kRows * stride;
    k_rot = q_cap + kRows * stride;
    k_raw = k_rot + kKeys * stride;
    v = k_raw + kKeys * stride;
    out = v + kKeys * stride;
    prob = out + kRows * stride;
    row_max = prob + kRows * kKeys;
    row_sum = row_max + kRows;
    correction = row_sum + kRows;
    pos = reinterpret_cast<int64_t*>(correction + kRows);
  }

  static size_t bytes(int64_t head_dim) {
    // An even count of floats keeps `pos` 8-byte aligned.
    const size_t floats = (3 * kRows + 3 * kKeys) * (head_dim + 1) + kRows * kKeys + 3 * kRows;
    return floats * sizeof(float) + kKeys * sizeof(int64_t);
  }
};

// What a block owns: query rows [t0, t0 + kRows) of one head of sequence b. Row t >= pad is
// real row t - pad, at position qs + t - pad; the block anchors its rotations at q0, the
// position row t0 would have.
struct GenericBlock {
  int64_t b, head, kv_head, n_q, t0, t_hi, qs, pad, n_real, q0;
  const int64_t* cache_positions;  // the sequence's row of slot positions

  __device__ explicit GenericBlock(const LambdaAttentionParams& p)
      : b(blockIdx.z), head(blockIdx.y), kv_head(head / (p.n_heads_q / p.n_heads_kv)),
        n_q(p.n_queries), t0(int64_t(blockIdx.x) * kRows), t_hi(min64(t0 + kRows, n_q) - 1) {
    const SequenceRows seq(p, b);  // read once
    qs = seq.start, pad = seq.padding, n_real = n_q - pad;
    q0 = qs + t0 - pad;
    cache_positions = p.cache_positions.of(b);
  }
  // Whether tile row r is a real row of the chunk.
  __device__ bool real_row(int64_t r) const { return t0 + r < n_q && t0 + r >= pad; }
};

// Queries in float32: q_local = R_{t - t0} q, q_cap = R_D q, and the row states emptied;
// padding rows and rows past the chunk are zero.
template <typename T>
__device__ __forceinline__ void load_queries(const LambdaAttentionParams& p,
                                             const GenericBlock& blk, const GenericSmem& sm) {
  const int64_t head_dim = p.head_dim, half = p.rotary_dim / 2, ld = sm.stride;
  const RowsView<const T> q = p.q.as<const T>().rows(blk.b, blk.head);
  for (int64_t idx = threadIdx.x; idx < kRows * head_dim; idx += kThreads) {
    const int64_t r = idx / head_dim, c = idx % head_dim;
    const bool valid = blk.real_row(r);
    const T* row = q.row(blk.t0 + r);
    float local = 0.f, cap = 0.f;
    if (valid && c < 2 * half) {
      const int64_t f = c < half ? c : c - half;
      const float x1 = to_f32(row[f]), x2 = to_f32(row[f + half]);
      float cs, sn, cap_cs, cap_sn;
      rope_sincos(r, p.inv_freq[f], &cs, &sn);
      rope_sincos(p.distance_cap, p.inv_freq[f], &cap_cs, &cap_sn);
      local = c < half ? x1 * cs - x2 * sn : x2 * cs + x1 * sn;
      cap = c < half ? x1 * cap_cs - x2 * cap_sn : x2 * cap_cs + x1 * cap_sn;
    } else if (valid) {
      local = cap = to_f32(row[c]);
    }
    sm.q_local[r * ld + c] = local;
    sm.q_cap[r * ld + c] = cap;
    sm.out[r * ld + c] = 0.f;
  }
  if (threadIdx.x < kRows) {
    sm.row_max[threadIdx.x] = -INFINITY;
    sm.row_sum[threadIdx.x] = 0.f;
  }
}

// The tile's key positions (-1: an empty slot, or past the sequence's real rows).
__device__ __forceinline__ void load_positions(const LambdaAttentionParams& p,
                                               const GenericBlock& blk, KeyTile tile,
                                               const GenericSmem& sm) {
  if (threadIdx.x >= kKeys) return;
  const int64_t row = tile.first + threadIdx.x;
  int64_t j = -1;
  if (tile.from_cache) {
    if (row < p.cache_len) j = blk.cache_positions[row];
  } else if (row < blk.n_real) {
    j = blk.qs + row;
  }
  sm.pos[threadIdx.x] = j;
}

// The tile's keys and values in float32 (missing rows: zeros), keys raw and, where some query
// of the block sees them locally, rotated by j - q0.
template <typename T>
__device__ __forceinline__ void load_keys(const LambdaAttentionParams& p, const GenericBlock& blk,
                                          KeyTile tile, const GenericSmem& sm) {
  const int64_t head_dim = p.head_dim, half = p.rotary_dim / 2, ld = sm.stride;
  // The tile's rows: cache slots, or the chunk's real rows (from row pad on).
  const StridedView<const T> k = (tile.from_cache ? p.cache_k : p.k).as<const T>();
  const StridedView<const T> v = (tile.from_cache ? p.cache_v : p.v).as<const T>();
  const int64_t first_row = tile.from_cache ? tile.first : blk.pad + tile.first;
  const KeyRange<int64_t> rotated = local_keys_of_any(int64_t(0), blk.t_hi - blk.t0, p.n_local);
  for (int64_t idx = threadIdx.x; idx < kKeys * head_dim; idx += kThreads) {
    const int64_t r = idx / head_dim, c = idx % head_dim;
    const int64_t j = sm.pos[r];
    const bool present = j >= 0;
    const T* k_row = k.at(blk.b, blk.kv_head, first_row + r);
    const float k_value = present ? to_f32(k_row[c]) : 0.f;
    sm.k_raw[r * ld + c] = k_value;
    sm.v[r * ld + c] = present ? to_f32(v.at(blk.b, blk.kv_head, first_row + r)[c]) : 0.f;
    const int64_t delta = j - blk.q0;  // relative to the anchor
    float value = k_value;
    if (present && rotated.contains(delta) && c < 2 * half) {
      const int64_t f = c < half ? c : c - half;
      const float x1 = to_f32(k_row[f]), x2 = to_f32(k_row[f + half]);
      float cs, sn;
      rope_sincos(delta, p.inv_freq[f], &cs, &sn);
      value = c < half ? x1 * cs - x2 * sn : x2 * cs + x1 * sn;
    }
    sm.k_rot[r * ld + c] = value;
  }
}

// Scores of every (query, key) pair of the tile, in the exp2 domain: local pairs meet the
// rotated query and key, global ones R_D q and the raw key, the rest are -inf.
__device__ __forceinline__ void score_pairs(const LambdaAttentionParams& p,
                                            const GenericBlock& blk, const GenericSmem& sm,
                                            float scale_log2) {
  const int64_t ld = sm.stride;
  for (int idx = threadIdx.x; idx < kRows * kKeys; idx += kThreads) {
    const int r = idx / kKeys, key = idx % kKeys;
    const int64_t j = sm.pos[key];
    const KeyVisibility seen = blk.real_row(r) && j >= 0
                                   ? key_visibility(blk.q0 + r - j, j < p.n_global, p.n_local)
                                   : KeyVisibility::kMasked;
    float score = -INFINITY;
    if (seen != KeyVisibility::kMasked) {
      const bool local = seen == KeyVisibility::kLocal;
      const float* qv = (local ? sm.q_local : sm.q_cap) + r * ld;
      const float* kv = (local ? sm.k_rot : sm.k_raw) + key * ld;
      float dot = 0.f;
      for (int64_t c = 0; c < p.head_dim; ++c) dot = fmaf(qv[c], kv[c], dot);
      score = dot * scale_log2;
    }
    sm.prob[idx] = score;
  }
}

// The online softmax, one thread per row: the tile's scores become probabilities, the row's
// max and sum move on, and the correction of what the row accumulated so far is kept.
__device__ __forceinline__ void softmax_rows(const GenericSmem& sm) {
  if (threadIdx.x >= kRows) return;
  const int r = threadIdx.x;
  float tile_max = -INFINITY;
  for (int key = 0; key < kKeys; ++key) tile_max = fmaxf(tile_max, sm.prob[r * kKeys + key]);
  const float new_max = fmaxf(sm.row_max[r], tile_max);
  const float ref = softmax_reference(new_max, 1.f);  // scores are scaled already
  const float correction = exp2f(sm.row_max[r] - ref);
  float sum = sm.row_sum[r] * correction;
  for (int key = 0; key < kKeys; ++key) {
    const float prob = exp2f(sm.prob[r * kKeys + key] - ref);
    sm.prob[r * kKeys + key] = prob;
    sum += prob;
  }
  sm.row_max[r] = new_max;
  sm.row_sum[r] = sum;
  sm.correction[r] = correction;
}

// out = out * correction + P V.
__device__ __forceinline__ void accumulate_values(int64_t head_dim, const GenericSmem& sm) {
  const int64_t ld = sm.stride;
  for (int64_t idx = threadIdx.x; idx < kRows * head_dim; idx += kThreads) {
    const int64_t r = idx / head_dim, c = idx % head_dim;
    float acc = sm.out[r * ld + c] * sm.correction[r];
    for (int key = 0; key < kKeys; ++key)
      acc = fmaf(sm.prob[r * kKeys + key], sm.v[key * ld + c], acc);
    sm.out[r * ld + c] = acc;
  }
}

// Every row of the block normalised by its sum, in T (a padding row saw no key: zeros).
template <typename T>
__device__ __forceinline__ void store_rows(const LambdaAttentionParams& p, const GenericBlock& blk,
                                           const GenericSmem& sm) {
  const int64_t head_dim = p.head_dim, ld = sm.stride;
  const RowsView<T> out = p.out.as<T>().rows(blk.b, blk.head);
  for (int64_t idx = threadIdx.x; idx < kRows * head_dim; idx += kThreads) {
    const int64_t r = idx / head_dim, c = idx % head_dim;
    if (blk.t0 + r >= blk.n_q) continue;
    const float sum = sm.row_sum[r];
    out.row(blk.t0 + r)[c] = from_f32<T>(sum > 0.f ? sm.out[r * ld + c] / sum : 0.f);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    lambda_attention_generic_kernel(const LambdaAttentionParams p) {
  extern __shared__ __align__(16) float smem_generic[];
  const GenericSmem sm(smem_generic, p.head_dim);
  const GenericBlock blk(p);
  load_queries<T>(p, blk, sm);
  const float scale_log2 = p.scale * 1.4426950408889634f;
  // Tiles of the block's real rows, in real-row coordinates (chunk key row u is row pad + u).
  const TileList<kKeys> tiles(p, blk.qs, max64(blk.t0 - blk.pad, 0), blk.t_hi - blk.pad,
                              blk.n_real);
  for (int64_t it = 0; it < tiles.count; ++it) {
    const KeyTile tile = tiles[it];
    __syncthreads();  // the previous tile is fully consumed (and the queries are ready)
    load_positions(p, blk, tile, sm);
    __syncthreads();
    load_keys<T>(p, blk, tile, sm);
    __syncthreads();
    score_pairs(p, blk, sm, scale_log2);
    __syncthreads();
    softmax_rows(sm);
    __syncthreads();
    accumulate_values(p.head_dim, sm);
  }
  __syncthreads();
  store_rows<T>(p, blk, sm);
}

template <typename T>
Status launch(const LambdaAttentionParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((p.n_queries + kRows - 1) / kRows),
                  static_cast<unsigned>(p.n_heads_q), static_cast<unsigned>(p.batch));
  return launch_kernel(lambda_attention_generic_kernel<T>, "lambda_attention_generic_kernel", grid,
                       kThreads, GenericSmem::bytes(p.head_dim), stream, p);
}

}  // namespace

Status launch_lambda_attention_generic(const LambdaAttentionParams& params, cudaStream_t stream) {
  if (params.n_heads_q > 65535 || params.batch > 65535)
    return Status::Unsupported("lambda_attention_cuda: batch=" + std::to_string(params.batch) +
                               " and n_heads_q=" + std::to_string(params.n_heads_q) +
                               " must each be at most 65535");
  switch (params.dtype) {
    case DType::kBFloat16: return launch<__nv_bfloat16>(params, stream);
    case DType::kFloat16: return launch<__half>(params, stream);
    default: return launch<float>(params, stream);
  }
}

}  // namespace lminf::cuda
