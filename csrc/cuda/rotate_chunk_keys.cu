// The chunk-anchored pre-pass of the tensor-core kernel (layout: PrefillWorkspace in
// lambda_attention_plan.cuh). With a the start of the sequence (the position of its first real
// row), the local score of query i and key j is
//     (R_i q) . (R_j k) = (R_{i-a} q) . (R_{j-a} k),
// so once every key the chunk can see locally is rotated by j - a here, the kernel rotates its
// Q tile once by i - a and its key loop holds no rotation at all. Every angle comes from an
// int64 difference taken first (j - a lies in (-n_local, n_queries)), so a stream at 10^9 gives
// bit-identical workspace contents to the same window at 10^3.
//
// Batches: each sequence has its own start, padding and (optionally) cache positions, so the
// index below has a row per sequence, unless they all share one (sequences_share_positions).
// Padding rows of the chunk are left out of the key sequence: its real rows follow the window
// directly, so the kernel sees one contiguous sliding-window sequence per sequence whatever its
// padding.
//
// Two launches, because the gather needs a barrier between clearing and filling its index:
//   gather_index_kernel (a block per index row): window_slot[u] = the cache slot holding
//     position a - window_rows + u, global_source[j] = where position j < n_global lives, and
//     the state (empty, partial, full) of each window tile, so the kernel skips empty tiles and
//     masks only partial ones;
//   rotate_keys_kernel: per row of the window, the chunk and the global tile, the rotated key
//     (or the raw global key) and the value, zero where no slot holds the position.
// A ring wraps its window across slots in any order; gathering by position makes the window a
// contiguous key range ending where the chunk begins, one plain sliding-window sequence.
#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"
#include "lambda_attention_plan.cuh"

namespace lminf::cuda {
namespace {

constexpr int kIndexThreads = 1024;
constexpr int kRotateThreads = 128;

size_t round_up_256(size_t bytes) { return (bytes + 255) / 256 * 256; }

__global__ void __launch_bounds__(kIndexThreads)
    gather_index_kernel(const LambdaAttentionParams p, const PrefillWorkspace ws,
                        unsigned char* __restrict__ workspace) {
  const int64_t b = blockIdx.x;  // the index row (= the sequence, or 0 for a shared index)
  const SequenceRows seq(p, b);
  const int64_t a = seq.start, n_real = p.n_queries - seq.padding;
  const int64_t* const cache_positions = p.cache_positions.of(b);
  const int window_rows = static_cast<int>(ws.window_rows);
  const int global_rows = static_cast<int>(ws.global_rows);
  int32_t* const window_slot = reinterpret_cast<int32_t*>(workspace + ws.window_slot) +
                               b * window_rows;
  int32_t* const global_source = reinterpret_cast<int32_t*>(workspace + ws.global_source) +
                                 b * global_rows;
  uint8_t* const window_tile_state =
      workspace + ws.window_tile_state + b * (window_rows / kMmaBlockKeys);
  const int64_t window_first = a - window_rows;  // position of window row 0
  for (int u = threadIdx.x; u < window_rows; u += kIndexThreads) window_slot[u] = -1;
  for (int j = threadIdx.x; j < global_rows; j += kIndexThreads) global_source[j] = -1;
  __syncthreads();  // also orders this block's global-memory writes
  for (int64_t slot = threadIdx.x; slot < p.cache_len; slot += kIndexThreads) {
    const int64_t pos = cache_positions[slot];
    if (pos < 0) continue;  // empty
    const int64_t u = pos - window_first;
    if (u >= 0 && u < window_rows) window_slot[u] = static_cast<int32_t>(slot);
    if (pos < p.n_global) global_source[pos] = static_cast<int32_t>(slot);
  }
  // Global positions held by the chunk's real rows: j in [a, a + n_real), chunk row
  // padding + (j - a).
  const int64_t chunk_lo = max64(a, 0), chunk_hi = min64(p.n_global, a + n_real);
  for (int64_t j = chunk_lo + threadIdx.x; j < chunk_hi; j += kIndexThreads)
    global_source[j] = static_cast<int32_t>(p.cache_len + seq.padding + (j - a));
  __syncthreads();
  for (int tile = threadIdx.x; tile < window_rows / kMmaBlockKeys; tile += kIndexThreads) {
    int held = 0;
    for (int r = 0; r < kMmaBlockKeys; ++r) held += window_slot[tile * kMmaBlockKeys + r] >= 0;
    window_tile_state[tile] = held == 0 ? kTileEmpty
                              : held == kMmaBlockKeys ? kTileFull
                                                      : kTilePartial;
  }
}

// One rotate_half pair (or two plain features) per thread, D / 2 threads per row. Rows
// [0, window_rows) are the window, then n_queries chunk rows (the sequence's real rows first;
// the last `padding` rows write nothing), then global_rows global rows.
template <typename T, int D>
__global__ void __launch_bounds__(kRotateThreads)
    rotate_keys_kernel(const LambdaAttentionParams p, const PrefillWorkspace ws,
                       unsigned char* __restrict__ workspace) {
  constexpr int kRowsPerBlock = kRotateThreads / (D / 2);
  const int window_rows = static_cast<int>(ws.window_rows);
  const int chunk_rows = static_cast<int>(p.n_queries);
  const int row = blockIdx.x * kRowsPerBlock + threadIdx.x / (D / 2);
  if (row >= window_rows + chunk_rows + ws.global_rows) return;
  const int64_t kv_head = blockIdx.y, b = blockIdx.z;
  const int lane = threadIdx.x % (D / 2);
  const int half = static_cast<int>(p.rotary_dim / 2);
  const SequenceRows seq(p, b);
  const int64_t a = seq.start;
  const int pad = static_cast<int>(seq.padding);
  const int64_t index_row = ws.index_row(b);
  const auto* slot_of = reinterpret_cast<const int32_t*>(workspace + ws.window_slot) +
                        index_row * window_rows;
  const auto* source_of = reinterpret_cast<const int32_t*>(workspace + ws.global_source) +
                          index_row * ws.global_rows;
  const int64_t* const cache_positions = p.cache_positions.of(b);
  const int64_t head_rows = b * p.n_heads_kv + kv_head;

  // Where the row's key and value come from, where they go, and its rotation offset.
  const T* src_k = nullptr;
  const T* src_v = nullptr;
  T* dst_k;
  T* dst_v = nullptr;
  bool rotate = true;
  int64_t delta = 0;
  const RowsView<const T> cache_k = p.cache_k.as<const T>().rows(b, kv_head);
  const RowsView<const T> cache_v = p.cache_v.as<const T>().rows(b, kv_head);
  const RowsView<const T> chunk_k = p.k.as<const T>().rows(b, kv_head);
  const RowsView<const T> chunk_v = p.v.as<const T>().rows(b, kv_head);
  T* const keys = reinterpret_cast<T*>(workspace + ws.keys) +
                  head_rows * (window_rows + chunk_rows) * D;
  if (row < window_rows) {
    const int32_t slot = slot_of[row];
    dst_k = keys + int64_t(row) * D;
    dst_v = reinterpret_cast<T*>(workspace + ws.values) + (head_rows * window_rows + row) * D;
    if (slot >= 0) {
      src_k = cache_k.row(slot);
      src_v = cache_v.row(slot);
      delta = cache_positions[slot] - a;  // in [-window_rows, 0)
    }
  } else if (row < window_rows + chunk_rows) {
    const int t = row - window_rows;  // the real row: chunk row pad + t, offset t from a
    if (t >= chunk_rows - pad) return;  // past the real rows: never read
    dst_k = keys + int64_t(row) * D;
    src_k = chunk_k.row(pad + t);  // the values stay where they are
    delta = t;
  } else {
    const int j = row - window_rows - chunk_rows;
    const int64_t global_row = head_rows * ws.global_rows + j;
    dst_k = reinterpret_cast<T*>(workspace + ws.global_keys) + global_row * D;
    dst_v = reinterpret_cast<T*>(workspace + ws.global_values) + global_row * D;
    rotate = false;  // global keys are scored unrotated, against R_D q
    const int32_t source = source_of[j];
    if (source >= 0 && source < p.cache_len) {
      src_k = cache_k.row(source);
      src_v = cache_v.row(source);
    } else if (source >= 0) {
      src_k = chunk_k.row(source - p.cache_len);
      src_v = chunk_v.row(source - p.cache_len);
    }
  }

  // Features (lo, hi): the pair (lane, lane + half) while lane < half, else two features past
  // rotary_dim; a missing row writes zeros (its slot may hold anything, and 0 * NaN is NaN).
  const int lo = lane < half ? lane : 2 * half + 2 * (lane - half);
  const int hi = lane < half ? lane + half : lo + 1;
  if (src_k == nullptr) {
    dst_k[lo] = dst_k[hi] = from_f32<T>(0.f);
    if (dst_v != nullptr) dst_v[lo] = dst_v[hi] = from_f32<T>(0.f);
    return;
  }
  const float x1 = to_f32(src_k[lo]), x2 = to_f32(src_k[hi]);
  if (rotate && lane < half) {
    float c, s;
    rope_sincos(delta, p.inv_freq[lane], &c, &s);
    dst_k[lo] = from_f32<T>(x1 * c - x2 * s);
    dst_k[hi] = from_f32<T>(x2 * c + x1 * s);
  } else {
    dst_k[lo] = src_k[lo];
    dst_k[hi] = src_k[hi];
  }
  if (dst_v != nullptr) {
    dst_v[lo] = src_v[lo];
    dst_v[hi] = src_v[hi];
  }
}

template <typename T, int D>
Status launch_rotate(const LambdaAttentionParams& p, const PrefillWorkspace& ws,
                     unsigned char* workspace, cudaStream_t stream) {
  constexpr int kRowsPerBlock = kRotateThreads / (D / 2);
  const int64_t rows = ws.window_rows + p.n_queries + ws.global_rows;
  const dim3 grid(static_cast<unsigned>((rows + kRowsPerBlock - 1) / kRowsPerBlock),
                  static_cast<unsigned>(p.n_heads_kv), static_cast<unsigned>(p.batch));
  rotate_keys_kernel<T, D><<<grid, kRotateThreads, 0, stream>>>(p, ws, workspace);
  return launch_status("rotate_keys_kernel");
}

}  // namespace

PrefillWorkspace plan_prefill_workspace(const LambdaAttentionParams& p, size_t base) {
  const auto round_up_tile = [](int64_t n) {
    return (n + kPrefillRowAlign - 1) / kPrefillRowAlign * kPrefillRowAlign;
  };
  PrefillWorkspace ws;
  ws.window_rows = p.cache_len > 0 ? round_up_tile(p.n_local - 1) : 0;
  ws.global_rows = round_up_tile(p.n_global);
  const auto heads = static_cast<size_t>(p.batch * p.n_heads_kv);
  const size_t row_bytes = static_cast<size_t>(p.head_dim) * 2;  // bf16 or fp16
  size_t at = base;
  const auto take = [&](size_t bytes) {
    const size_t offset = at;
    at += round_up_256(bytes);
    return offset;
  };
  ws.keys = take(heads * static_cast<size_t>(ws.window_rows + p.n_queries) * row_bytes);
  ws.values = take(heads * static_cast<size_t>(ws.window_rows) * row_bytes);
  ws.global_keys = take(heads * static_cast<size_t>(ws.global_rows) * row_bytes);
  ws.global_values = take(heads * static_cast<size_t>(ws.global_rows) * row_bytes);
  // Index rows: one per sequence, whether or not they are all used (sizes only).
  const auto sequences = static_cast<size_t>(p.batch);
  ws.window_slot = take(sequences * static_cast<size_t>(ws.window_rows) * sizeof(int32_t));
  ws.global_source = take(sequences * static_cast<size_t>(ws.global_rows) * sizeof(int32_t));
  ws.window_tile_state = take(sequences * static_cast<size_t>(ws.window_rows / kMmaBlockKeys));
  ws.per_sequence = !sequences_share_positions(p);
  ws.end = at;
  return ws;
}

Status launch_rotate_chunk_keys(const LambdaAttentionParams& params, const AttentionPlan& plan,
                                void* workspace, cudaStream_t stream) {
  const PrefillWorkspace& ws = plan.prefill;
  auto* base = static_cast<unsigned char*>(workspace);
  // One index row per sequence, or one for the whole batch.
  const auto index_rows = static_cast<unsigned>(ws.per_sequence ? params.batch : 1);
  gather_index_kernel<<<index_rows, kIndexThreads, 0, stream>>>(params, ws, base);
  Status status = launch_status("gather_index_kernel");
  if (!status.ok()) return status;
  return dispatch_kernel_types(params, [&](auto t, auto d) {
    return launch_rotate<typename decltype(t)::type, decltype(d)::value>(params, ws, base, stream);
  });
}

}  // namespace lminf::cuda
