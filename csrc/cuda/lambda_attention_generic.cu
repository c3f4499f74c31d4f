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

template <typename T>
__global__ void __launch_bounds__(kThreads)
    lambda_attention_generic_kernel(const LambdaAttentionParams p) {
  extern __shared__ __align__(16) float smem_generic[];
  const int64_t head_dim = p.head_dim, half = p.rotary_dim / 2;
  GenericSmem sm(smem_generic, head_dim);
  const int64_t ld = sm.stride;
  const int64_t b = blockIdx.z, head = blockIdx.y;
  const int64_t kv_head = head / (p.n_heads_q / p.n_heads_kv);
  const int64_t n_q = p.n_queries;
  const int64_t t0 = int64_t(blockIdx.x) * kRows;  // rows of q and out
  const int64_t t_hi = min64(t0 + kRows, n_q) - 1;
  // The sequence: row t >= pad is real row t - pad, at position qs + t - pad.
  const SequenceRows seq(p, b);
  const int64_t qs = seq.start, pad = seq.padding, n_real = n_q - pad;
  const int64_t* const cache_positions = p.cache_positions.of(b);
  const int64_t q0 = qs + t0 - pad;  // rotation anchor: the position row t0 would have

  // Queries: q_local = R_{t - t0} q, q_cap = R_D q; padding rows and rows past the chunk are
  // zero.
  const RowsView<const T> q = p.q.as<const T>().rows(b, head);
  for (int64_t idx = threadIdx.x; idx < kRows * head_dim; idx += kThreads) {
    const int64_t r = idx / head_dim, c = idx % head_dim;
    const bool valid = t0 + r < n_q && t0 + r >= pad;
    const T* row = q.row(t0 + r);
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

  const float scale_log2 = p.scale * 1.4426950408889634f;
  // Tiles of the block's real rows, in real-row coordinates (chunk key row u is row pad + u).
  const TileList<kKeys> tiles(p, qs, max64(t0 - pad, 0), t_hi - pad, n_real);
  for (int64_t it = 0; it < tiles.count; ++it) {
    const KeyTile tile = tiles[it];
    __syncthreads();  // the previous tile is fully consumed (and the queries are ready)

    // Positions, then keys and values in float32 (empty or missing rows: zero values).
    if (threadIdx.x < kKeys) {
      const int64_t row = tile.first + threadIdx.x;
      int64_t j = -1;
      if (tile.from_cache) {
        if (row < p.cache_len) j = cache_positions[row];
      } else if (row < n_real) {
        j = qs + row;
      }
      sm.pos[threadIdx.x] = j;
    }
    __syncthreads();
    // The tile's rows: cache slots, or the chunk's real rows (from row pad on).
    const StridedView<const T> k = (tile.from_cache ? p.cache_k : p.k).as<const T>();
    const StridedView<const T> v = (tile.from_cache ? p.cache_v : p.v).as<const T>();
    const int64_t first_row = tile.from_cache ? tile.first : pad + tile.first;
    for (int64_t idx = threadIdx.x; idx < kKeys * head_dim; idx += kThreads) {
      const int64_t r = idx / head_dim, c = idx % head_dim;
      const int64_t j = sm.pos[r];
      const bool present = j >= 0;
      const T* k_row = k.at(b, kv_head, first_row + r);
      const float k_value = present ? to_f32(k_row[c]) : 0.f;
      sm.k_raw[r * ld + c] = k_value;
      sm.v[r * ld + c] = present ? to_f32(v.at(b, kv_head, first_row + r)[c]) : 0.f;
      // Rotate keys the block's queries can see locally: j - q0 in (-n_local, t_hi - t0].
      const int64_t delta = j - q0;
      float rotated = k_value;
      if (present && delta > -p.n_local && delta <= t_hi - t0 && c < 2 * half) {
        const int64_t f = c < half ? c : c - half;
        const float x1 = to_f32(k_row[f]), x2 = to_f32(k_row[f + half]);
        float cs, sn;
        rope_sincos(delta, p.inv_freq[f], &cs, &sn);
        rotated = c < half ? x1 * cs - x2 * sn : x2 * cs + x1 * sn;
      }
      sm.k_rot[r * ld + c] = rotated;
    }
    __syncthreads();

    // Scores in the exp2 domain; -inf where masked.
    for (int idx = threadIdx.x; idx < kRows * kKeys; idx += kThreads) {
      const int r = idx / kKeys, key = idx % kKeys;
      const int64_t j = sm.pos[key];
      const int64_t d = q0 + r - j;
      const float *qv = nullptr, *kv = nullptr;
      if (t0 + r < n_q && t0 + r >= pad && j >= 0 && d >= 0) {
        if (d < p.n_local) {
          qv = sm.q_local + r * ld;
          kv = sm.k_rot + key * ld;
        } else if (j < p.n_global) {
          qv = sm.q_cap + r * ld;
          kv = sm.k_raw + key * ld;
        }
      }
      float score = -INFINITY;
      if (qv != nullptr) {
        float dot = 0.f;
        for (int64_t c = 0; c < head_dim; ++c) dot = fmaf(qv[c], kv[c], dot);
        score = dot * scale_log2;
      }
      sm.prob[idx] = score;
    }
    __syncthreads();

    // Online softmax, one thread per row.
    if (threadIdx.x < kRows) {
      const int r = threadIdx.x;
      float tile_max = -INFINITY;
      for (int key = 0; key < kKeys; ++key) tile_max = fmaxf(tile_max, sm.prob[r * kKeys + key]);
      const float new_max = fmaxf(sm.row_max[r], tile_max);
      const float ref = new_max == -INFINITY ? 0.f : new_max;
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
    __syncthreads();

    for (int64_t idx = threadIdx.x; idx < kRows * head_dim; idx += kThreads) {
      const int64_t r = idx / head_dim, c = idx % head_dim;
      float acc = sm.out[r * ld + c] * sm.correction[r];
      for (int key = 0; key < kKeys; ++key)
        acc = fmaf(sm.prob[r * kKeys + key], sm.v[key * ld + c], acc);
      sm.out[r * ld + c] = acc;
    }
  }
  __syncthreads();

  const RowsView<T> out = p.out.as<T>().rows(b, head);
  for (int64_t idx = threadIdx.x; idx < kRows * head_dim; idx += kThreads) {
    const int64_t r = idx / head_dim, c = idx % head_dim;
    if (t0 + r >= n_q) continue;
    const float sum = sm.row_sum[r];  // 0 for a padding row: it saw no key
    out.row(t0 + r)[c] = from_f32<T>(sum > 0.f ? sm.out[r * ld + c] / sum : 0.f);
  }
}

template <typename T>
Status launch(const LambdaAttentionParams& p, cudaStream_t stream) {
  const size_t smem = GenericSmem::bytes(p.head_dim);
  auto* kernel = lambda_attention_generic_kernel<T>;
  const Status status = allow_dynamic_smem(kernel, smem, "lambda_attention");
  if (!status.ok()) return status;
  const dim3 grid(static_cast<unsigned>((p.n_queries + kRows - 1) / kRows),
                  static_cast<unsigned>(p.n_heads_q), static_cast<unsigned>(p.batch));
  kernel<<<grid, kThreads, smem, stream>>>(p);
  return launch_status("lambda_attention_generic_kernel");
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
