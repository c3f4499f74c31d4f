// Λ-attention for decode: chunks of 1 to 16 queries against the ring cache, at memory speed.
//
// Work split. A block owns one KV head of one batch row, 16 query rows (the KV group's query
// heads stacked, row r = head_in_group * n_queries + t: every K/V read serves all of them) and
// one split: a contiguous run of 64-key chunks of the virtual key list (cache slots 0 ..
// cache_len-1, then the chunk's own tokens). plan_attention sizes the splits so that the grid
// is one wave of the GPU; kDecodeStages chunks are in flight per block (cp.async, 16-byte
// pieces), which at batch 1 is the whole split. Each of the 4 warps takes 16 keys of every
// chunk and keeps its own online softmax; the warps are combined through shared memory at the
// end, and the splits by decode_merge_kernel (a second launch, programmatic-dependent so that
// its launch latency overlaps the first; no global counters, so the pair is capturable in a
// CUDA graph).
//
// Batches: each sequence has its own start a (the position of its first real row), leading
// padding rows and, optionally, its own row of cache positions (LambdaAttentionParams), read
// once per block. Padding rows are left out of the virtual key list (it is the cache slots,
// then the sequence's real rows), so the key loop is the same with or without padding; their
// output rows are zeros.
//
// RoPE, anchored at the sequence's first real query a: real query t' (row pad + t') is
// rotated by t' (< 16) once, each key by j - a in registers, between its ldmatrix and its mma,
// so that
//     (R_t' q) . (R_{j-a} k) = q . R_{j-i} k,  i = a + t',
// the local score. A thread holds both halves of every rotate_half pair of its two keys (the
// mma B fragment of feature f and of f + head_dim/2 sit in the same lane), so no shuffle is
// needed. Angles: an exact float32 seed (rope_sincos_f32 of the int32 difference j - a) when
// a thread's key does not continue its previous one, else one complex multiply by a constant
// step (the key 64 slots further, or the next slot). Only differences of positions, bounded by
// n_local + 16, ever reach sin/cos; positions are int64 until then. Global keys (j < n_global,
// i - j >= n_local) meet R_D q with the unrotated key, computed before the rotation, and only
// in chunks that hold one.
//
// Masks: empty slots (position < 0) and padding carry a sentinel distance; a warp whose 16 keys
// are local for every query skips the per-element select.
#include <cuda_runtime.h>

#include <atomic>
#include <climits>
#include <cmath>

#include "common.cuh"
#include "epilogue.cuh"
#include "fragment.cuh"
#include "lambda_attention_plan.cuh"
#include "lminf/lambda_mask.h"
#include "rope_f32.cuh"
#include "softmax.cuh"

namespace lminf::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kRows = kDecodeTileRows;   // query rows per block (one m16 tile)
constexpr int kChunk = kDecodeChunkKeys;  // keys per chunk, 16 per warp
constexpr int kStages = kDecodeStages;
static_assert(kChunk == 16 * kWarps, "a warp takes one k16 step of P V per chunk");

// Distances are int32 once taken: clamped to +-2^30, with this sentinel for empty slots and
// padding keys (t - kNoKey < 0 for every query, so they are never attended).
constexpr int kNoKey = INT_MAX;
constexpr int kFar = 1 << 30;
constexpr int kNoRotation = INT_MIN;  // a key no query sees locally

// K/V tiles are [kChunk][D] with 16-byte pieces XOR-swizzled by row / 2: a warp's ldmatrix
// reads rows 16w + 2i (+1) for i = 0..7 (see key_row below), which then hit distinct banks.
template <int D> __device__ __forceinline__ int kv_swz(int row, int col) {
  return row * D + ((((col >> 3) ^ ((row >> 1) & 7))) << 3) + (col & 7);
}
// Q tiles are read by ldmatrix in consecutive rows: swizzle by row.
template <int D> __device__ __forceinline__ int q_swz(int row, int col) {
  return row * D + ((((col >> 3) ^ (row & 7))) << 3) + (col & 7);
}

template <typename T, int D> struct DecodeSmem {
  static constexpr int kTile = kChunk * D;  // elements of one K (or V) stage
  // k, v [kStages][kChunk][D]; pos [kStages][kChunk] key positions (-1: empty or padding);
  // q [kRows][D] R_t q; q_cap [kRows][D] R_D q; step [D/2] float4 (cos, sin) of one and of
  // kChunk positions per frequency; cap [D/2] float2 (cos, sin) of distance_cap; inv_freq [D/2].
  // At the end, the k region holds each warp's output [kWarps][kRows][D] float32, then its
  // row max and sum [kWarps][kRows][2].
  static constexpr size_t kK = 0;
  static constexpr size_t kV = kK + kStages * kTile * sizeof(T);
  static constexpr size_t kPos = kV + kStages * kTile * sizeof(T);
  static constexpr size_t kQ = kPos + kStages * kChunk * sizeof(int64_t);
  static constexpr size_t kQCap = kQ + kRows * D * sizeof(T);
  static constexpr size_t kStep = kQCap + kRows * D * sizeof(T);
  static constexpr size_t kCap = kStep + D / 2 * sizeof(float4);
  static constexpr size_t kInvFreq = kCap + D / 2 * sizeof(float2);
  static constexpr size_t kBytes = kInvFreq + D / 2 * sizeof(float);
  static constexpr size_t kWarpOut = kK;
  static constexpr size_t kWarpStats = kWarpOut + kWarps * kRows * D * sizeof(float);
  static_assert(kWarpStats + kWarps * kRows * 2 * sizeof(float) <= kV, "epilogue scratch");
};

// Programmatic dependent launch (sm_90+): the merge is launched while the decode kernel still
// runs, so its launch latency hides behind the decode kernel's tail. No-ops elsewhere, and when
// the launch was an ordinary one.
__device__ __forceinline__ void grid_dependents_may_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void wait_for_prerequisite_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// cos/sin of one key's distance at the D/8 frequencies a lane rotates: entry i is frequency
// 16 (i / 4) + 8 ((i / 2) % 2) + 2 (lane % 4) + i % 2, the order of the lane's B fragments.
template <int D> struct LaneAngles {
  static constexpr int kCount = D / 8;
  float c[kCount], s[kCount];

  __device__ static int frequency(int i, int lane) {
    return 16 * (i / 4) + 8 * ((i / 2) % 2) + 2 * (lane % 4) + i % 2;
  }
  // Exact angles of delta (float32 only).
  __device__ void seed(int delta, const float* inv_freq, int lane) {
#pragma unroll
    for (int i = 0; i < kCount; ++i)
      rope_sincos_f32(delta, inv_freq[frequency(i, lane)], &c[i], &s[i]);
  }
  // from's angles plus a constant step: one position (step.x, step.y) or kChunk positions
  // (step.z, step.w) per frequency. `from` may be *this.
  __device__ void advance(const LaneAngles& from, const float4* steps, bool by_chunk, int lane) {
#pragma unroll
    for (int i = 0; i < kCount; ++i) {
      const float4 step = steps[frequency(i, lane)];
      const float sc = by_chunk ? step.z : step.x, ss = by_chunk ? step.w : step.y;
      const float cn = from.c[i] * sc - from.s[i] * ss, sn = from.s[i] * sc + from.c[i] * ss;
      c[i] = cn;
      s[i] = sn;
    }
  }
};

// Rotates one key in a lane's B fragments: kf[ks][2 tile + sub] holds the features (f, f + 1),
// kf[ks + D/32][2 tile + sub] their rotate_half partners (f + D/2, f + D/2 + 1).
template <typename T, int D>
__device__ __forceinline__ void rotate_key(uint32_t (&kf)[D / 16][4], int tile,
                                           const LaneAngles<D>& angle) {
#pragma unroll
  for (int ks = 0; ks < D / 32; ++ks)
#pragma unroll
    for (int sub = 0; sub < 2; ++sub) {
      uint32_t& lo = kf[ks][2 * tile + sub];
      uint32_t& hi = kf[ks + D / 32][2 * tile + sub];
      const float2 x = unpack2<T>(lo), y = unpack2<T>(hi);
      const int i = 4 * ks + 2 * sub;
      const float c0 = angle.c[i], c1 = angle.c[i + 1], s0 = angle.s[i], s1 = angle.s[i + 1];
      lo = pack2<T>(x.x * c0 - y.x * s0, x.y * c1 - y.y * s1);
      hi = pack2<T>(y.x * c0 + x.x * s0, y.y * c1 + x.y * s1);
    }
}

// What a block owns: KV head kv_head of sequence b, the 16 stacked rows [r0, r0 + 16) of its
// group's query heads (row r = head_in_group * n_queries + t), and split `split` of its chunks.
// Small counts as int32: plan_attention routes only shapes that fit here.
struct DecodeBlock {
  int split, n_q, group, rows_total, r0, pad, n_real;
  int64_t kv_head, b;
  int64_t qs;  // the sequence's start: row t >= pad is real row t - pad, at position qs + t - pad

  __device__ DecodeBlock(const LambdaAttentionParams& p, int n_splits) {
    split = static_cast<int>(blockIdx.x) % n_splits;
    r0 = static_cast<int>(blockIdx.x) / n_splits * kRows;
    kv_head = blockIdx.y, b = blockIdx.z;
    n_q = static_cast<int>(p.n_queries);
    group = static_cast<int>(p.n_heads_q) / static_cast<int>(p.n_heads_kv);
    rows_total = group * n_q;
    const SequenceRows seq(p, b);  // read once
    qs = seq.start;
    pad = static_cast<int>(seq.padding);
    n_real = n_q - pad;
  }
};

// Where one (batch row, KV head) reads its keys: the virtual key list is the cache slots, then
// the chunk's real rows (k and v from the first real row; query_start = that row's position).
template <typename T> struct KeySource {
  RowsView<const T> cache_k, cache_v, k, v;
  const int64_t* cache_positions;  // the sequence's row of slot positions
  int64_t cache_len, n_keys, query_start;

  // Base pointers formed once (opaque: not re-derived from b and the strides per chunk).
  __device__ KeySource(const LambdaAttentionParams& p, const DecodeBlock& blk)
      : cache_k(p.cache_k.as<const T>().rows(blk.b, blk.kv_head)),
        cache_v(p.cache_v.as<const T>().rows(blk.b, blk.kv_head)),
        k(p.k.as<const T>().rows(blk.b, blk.kv_head)),
        v(p.v.as<const T>().rows(blk.b, blk.kv_head)),
        cache_positions(opaque(p.cache_positions.of(blk.b))),
        cache_len(p.cache_len),
        n_keys(p.cache_len + blk.n_real),
        query_start(blk.qs) {
    k.data = k.row(blk.pad);
    v.data = v.row(blk.pad);
    cache_k.data = opaque(cache_k.data);
    cache_v.data = opaque(cache_v.data);
  }
};

// Issues the cp.async copies of chunk `chunk` into one stage. Keys past the end are
// zero-filled and get position -1.
template <typename T, int D>
__device__ __forceinline__ void load_chunk(const KeySource<T>& src, int chunk, T* s_k, T* s_v,
                                           int64_t* s_pos) {
  constexpr int kPieces = D / 8;
  constexpr int kRowsPerPass = kThreads / kPieces;
  const int piece = threadIdx.x % kPieces;
  const int64_t first = int64_t(chunk) * kChunk;
#pragma unroll
  for (int i = 0; i < kChunk / kRowsPerPass; ++i) {
    const int r = threadIdx.x / kPieces + i * kRowsPerPass;
    const int64_t key = first + r;
    const T* k_row = src.k.data;  // any mapped address when the piece is zero-filled
    const T* v_row = src.v.data;
    const bool valid = key < src.n_keys;
    if (key < src.cache_len) {
      k_row = src.cache_k.row(key);
      v_row = src.cache_v.row(key);
    } else if (valid) {
      k_row = src.k.row(key - src.cache_len);
      v_row = src.v.row(key - src.cache_len);
    }
    const int offset = valid ? piece * 8 : 0;
    cp_async_16(s_k + kv_swz<D>(r, piece * 8), k_row + offset, valid);
    cp_async_16(s_v + kv_swz<D>(r, piece * 8), v_row + offset, valid);
  }
  if (threadIdx.x < kChunk) {
    const int64_t key = first + threadIdx.x;
    if (key < src.cache_len)
      cp_async_8(s_pos + threadIdx.x, src.cache_positions + key);
    else
      s_pos[threadIdx.x] = key < src.n_keys ? src.query_start + (key - src.cache_len) : -1;
  }
}

// The block's shared memory (DecodeSmem), as typed pointers.
template <typename T, int D> struct DecodeShared {
  using Smem = DecodeSmem<T, D>;
  T *k, *v, *q, *q_cap;
  int64_t* pos;
  float4* step;
  float2* cap;
  float* inv_freq;

  __device__ explicit DecodeShared(unsigned char* smem)
      : k(reinterpret_cast<T*>(smem + Smem::kK)), v(reinterpret_cast<T*>(smem + Smem::kV)),
        q(reinterpret_cast<T*>(smem + Smem::kQ)), q_cap(reinterpret_cast<T*>(smem + Smem::kQCap)),
        pos(reinterpret_cast<int64_t*>(smem + Smem::kPos)),
        step(reinterpret_cast<float4*>(smem + Smem::kStep)),
        cap(reinterpret_cast<float2*>(smem + Smem::kCap)),
        inv_freq(reinterpret_cast<float*>(smem + Smem::kInvFreq)) {}

  // Issues chunk `chunk` into `stage` if it is one of the block's (< c_end); always one
  // cp.async group (possibly empty), so that the wait counts hold.
  __device__ void issue(const KeySource<T>& src, int chunk, int c_end, int stage) const {
    if (chunk < c_end)
      load_chunk<T, D>(src, chunk, k + stage * Smem::kTile, v + stage * Smem::kTile,
                       pos + stage * kChunk);
    cp_async_commit();
  }
};

// Copies the block's 16 stacked query rows into s_q (one cp.async group; rows past the group's
// rows zero-filled).
template <typename T, int D>
__device__ __forceinline__ void stage_q_rows(const LambdaAttentionParams& p, const DecodeBlock& blk,
                                             T* s_q) {
  constexpr int kPieces = D / 8;  // 16-byte pieces per row
  const StridedView<const T> q = p.q.as<const T>();
  for (int idx = threadIdx.x; idx < kRows * kPieces; idx += kThreads) {
    const int r = idx / kPieces, piece = idx % kPieces;
    const int row = blk.r0 + r;
    const bool valid = row < blk.rows_total;
    const T* row_ptr =
        valid ? q.at(blk.b, blk.kv_head * blk.group + row / blk.n_q, row % blk.n_q) + piece * 8
              : q.data;
    cp_async_16(s_q + q_swz<D>(r, piece * 8), row_ptr, valid);
  }
  cp_async_commit();
}

// Per-frequency constants, exact (FP64, once per block): the steps of the key recurrences (one
// and kChunk positions), R_D's angles, and the frequencies themselves.
template <typename T, int D>
__device__ __forceinline__ void store_frequency_constants(const LambdaAttentionParams& p,
                                                          const DecodeShared<T, D>& sm) {
  if (threadIdx.x >= D / 2) return;
  const float w = p.inv_freq[threadIdx.x];
  float4 step;
  float2 cap;
  rope_sincos(1, w, &step.x, &step.y);
  rope_sincos(kChunk, w, &step.z, &step.w);
  rope_sincos(p.distance_cap, w, &cap.x, &cap.y);
  sm.step[threadIdx.x] = step;
  sm.cap[threadIdx.x] = cap;
  sm.inv_freq[threadIdx.x] = w;
}

// Rotates the staged queries: s_q <- R_t' q, s_qcap <- R_D q, one (row, frequency) pair per
// thread and step (rotary_dim == D on this path). Rows past the tile were zero-filled and stay
// zero; padding rows are rotated by a small negative t' and never used.
template <typename T, int D>
__device__ __forceinline__ void rotate_q_rows(const DecodeBlock& blk,
                                              const DecodeShared<T, D>& sm) {
  for (int idx = threadIdx.x; idx < kRows * (D / 2); idx += kThreads) {
    const int r = idx / (D / 2), f = idx % (D / 2);
    const int row = blk.r0 + r;
    float c = 1.f, s = 0.f;
    if (row < blk.rows_total) rope_sincos_f32(row % blk.n_q - blk.pad, sm.inv_freq[f], &c, &s);
    const float2 cap = sm.cap[f];
    T* const lo = sm.q + q_swz<D>(r, f);
    T* const hi = sm.q + q_swz<D>(r, f + D / 2);
    const float x1 = to_f32(*lo), x2 = to_f32(*hi);
    *lo = from_f32<T>(x1 * c - x2 * s);
    *hi = from_f32<T>(x2 * c + x1 * s);
    sm.q_cap[q_swz<D>(r, f)] = from_f32<T>(x1 * cap.x - x2 * cap.y);
    sm.q_cap[q_swz<D>(r, f + D / 2)] = from_f32<T>(x2 * cap.x + x1 * cap.y);
  }
}

// The 16 stacked rows (R_t q, or R_D q) as mma A fragments.
template <typename T, int D>
__device__ __forceinline__ void load_q_fragment(uint32_t (&a)[4], const T* s_q, int ks, int lane) {
  ldmatrix_x4(a, s_q + q_swz<D>((lane % 8) + 8 * ((lane / 8) % 2), ks * 16 + 8 * (lane / 16)));
}

// The two rows a thread holds in every accumulator (lane / 4 and + 8 of the block's 16), as
// real rows t' (padding rows and rows past the tile are not valid: they see nothing).
struct DecodeRows {
  bool valid[2];
  int t[2];

  __device__ DecodeRows(const DecodeBlock& blk, int lane) {
#pragma unroll
    for (int a = 0; a < 2; ++a) {
      const int row = blk.r0 + lane / 4 + 8 * a;
      valid[a] = row < blk.rows_total && row % blk.n_q >= blk.pad;
      t[a] = valid[a] ? row % blk.n_q - blk.pad : 0;
    }
  }
};

// One key of a chunk as a lane sees it (lanes l and l + 16 describe slot 16 warp + l): its
// distance from the anchor, clamped to int32, and what the block's queries (real rows [0,
// last_t]) make of it (lambda_mask.h).
struct ChunkKey {
  int kd;          // position - qs; kNoKey for an empty slot or past the key list
  bool empty, is_global;
  bool seen_local;   // some query sees it locally
  bool seen_global;  // some query sees it beyond its window, as a global key
  bool all_local;    // every query sees it locally

  __device__ ChunkKey(int64_t j, int64_t qs, int64_t n_global, int last_t, int n_local,
                      KeyRange<int> local_to_any, KeyRange<int> local_to_all) {
    empty = j < 0;
    kd = empty ? kNoKey : static_cast<int>(max64(-kFar, min64(j - qs, kFar)));
    is_global = !empty && j < n_global;
    seen_local = !empty && local_to_any.contains(kd);
    seen_global = lminf::is_global(last_t - kd, is_global, n_local);
    all_local = !empty && local_to_all.contains(kd);
  }
};

// Empty slots' values may hold anything, and 0 * NaN is NaN: zero those rows of the warp's 16
// keys (its own slots, so a warp barrier orders it).
template <typename T, int D>
__device__ __forceinline__ void zero_empty_values(T* v_st, bool empty, int warp, int lane) {
  for (unsigned empties = __ballot_sync(0xffffffffu, empty) & 0xffffu; empties != 0;
       empties &= empties - 1) {
    const int slot = 16 * warp + __ffs(empties) - 1;
    if (lane < D / 8)
      *reinterpret_cast<uint4*>(v_st + slot * D + lane * 8) = make_uint4(0, 0, 0, 0);
  }
  __syncwarp();
}

// Local scores of the warp's 16 keys: each of the thread's two keys (consecutive slots) is
// rotated by its distance in registers, then Q K^T. Angles: the first key continues the same
// slot of the previous chunk (kChunk positions on: one complex step) or seeds; the second is
// one position after the first or seeds. prev_delta carries the first key's distance across
// chunks (kNoRotation: none).
template <typename T, int D>
__device__ __forceinline__ void local_scores(float (&acc)[2][4], uint32_t (&kf)[D / 16][4],
                                             const uint32_t (&q_frag)[D / 16][4],
                                             const ChunkKey& key, LaneAngles<D>& angles,
                                             int& prev_delta, const DecodeShared<T, D>& sm,
                                             int lane) {
  const int own_key = 2 * (lane / 4);  // + tile, in the warp
  const int rot_delta = key.seen_local ? key.kd : kNoRotation;
  const int delta0 = __shfl_sync(0xffffffffu, rot_delta, own_key);
  const int delta1 = __shfl_sync(0xffffffffu, rot_delta, own_key + 1);
  if (delta0 != kNoRotation) {
    if (prev_delta != kNoRotation && delta0 == prev_delta + kChunk)
      angles.advance(angles, sm.step, true, lane);
    else
      angles.seed(delta0, sm.inv_freq, lane);
    rotate_key<T, D>(kf, 0, angles);
  }
  prev_delta = delta0;
  if (delta1 != kNoRotation) {
    LaneAngles<D> next;
    if (delta0 != kNoRotation && delta1 == delta0 + 1)
      next.advance(angles, sm.step, false, lane);
    else
      next.seed(delta1, sm.inv_freq, lane);
    rotate_key<T, D>(kf, 1, next);
  }
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    mma_16816<T>(acc[0], q_frag[ks], kf[ks][0], kf[ks][1]);
    mma_16816<T>(acc[1], q_frag[ks], kf[ks][2], kf[ks][3]);
  }
}

// Global scores of the warp's 16 keys, from the unrotated fragments: (R_D q) . k.
template <typename T, int D>
__device__ __forceinline__ void global_scores(float (&acc)[2][4], const uint32_t (&kf)[D / 16][4],
                                              const T* s_qcap, int lane) {
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    uint32_t qf[4];
    load_q_fragment<T, D>(qf, s_qcap, ks, lane);
    mma_16816<T>(acc[0], qf, kf[ks][0], kf[ks][1]);
    mma_16816<T>(acc[1], qf, kf[ks][2], kf[ks][3]);
  }
}

// Each score from the local or the global accumulator, or -inf, as the Λ mask says (accumulator
// element (tile, 2 a + e) is row lane/4 + 8 a and key column 2 (lane % 4) + e of the tile, i.e.
// slot 16 warp + 4 (lane % 4) + 2 e + tile; that slot's lane holds its ChunkKey).
__device__ __forceinline__ void select_scores(float (&score)[2][4], const float (&local)[2][4],
                                              const float (&global)[2][4], const ChunkKey& key,
                                              const DecodeRows& rows, int n_local, int lane) {
#pragma unroll
  for (int tile = 0; tile < 2; ++tile)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int from = 4 * (lane % 4) + 2 * e + tile;
      const int key_d = __shfl_sync(0xffffffffu, key.kd, from);
      const bool key_global = __shfl_sync(0xffffffffu, key.is_global, from);
#pragma unroll
      for (int a = 0; a < 2; ++a) {
        const int d = rows.t[a] - key_d;  // the query-key distance; < 0 for kNoKey
        const bool seen_local = rows.valid[a] && is_local(d, n_local);
        const bool seen_global = rows.valid[a] && lminf::is_global(d, key_global, n_local);
        score[tile][2 * a + e] = seen_local    ? local[tile][2 * a + e]
                                 : seen_global ? global[tile][2 * a + e]
                                               : -INFINITY;
      }
    }
}

// O += P V over the warp's 16 keys: the two score tiles are exactly an A fragment whose k index
// m is slot 2 (m % 8) + m / 8 of the warp; the V rows are read in that order.
template <typename T, int D>
__device__ __forceinline__ void accumulate_pv(float (&out_acc)[D / 8][4], const float (&prob)[2][4],
                                              const T* v_st, int warp, int lane) {
  const int v_row = 16 * warp + 2 * (lane % 8) + ((lane / 8) % 2);  // V ldmatrix rows
  uint32_t pf[4];
  probability_fragment<T>(prob, 0, pf);
#pragma unroll
  for (int dp = 0; dp < D / 16; ++dp) {
    uint32_t vf[4];
    ldmatrix_x4_trans(vf, v_st + kv_swz<D>(v_row, dp * 16 + 8 * (lane / 16)));
    mma_16816<T>(out_acc[2 * dp], pf, vf[0], vf[1]);
    mma_16816<T>(out_acc[2 * dp + 1], pf, vf[2], vf[3]);
  }
}

// The epilogue: the four warps' partial softmaxes meet in shared memory (the stages are free
// once every copy has landed and every warp is past its last chunk), then thread (r, part)
// finishes row r, columns [part * kCols, (part + 1) * kCols), and writes it (epilogue.cuh). A
// padding row is zeros (and, split, a partial that weighs nothing), whatever a mask-free chunk
// left in its accumulators.
template <typename T, int D>
__device__ __forceinline__ void combine_warps_and_store(
    const OutputRows<T>& dst, const DecodeBlock& blk, unsigned char* smem,
    const float (&out_acc)[D / 8][4], const float (&row_max)[2], const float (&row_sum)[2],
    float scale_log2, int warp, int lane) {
  using Smem = DecodeSmem<T, D>;
  cp_async_wait<0>();
  __syncthreads();
  float* const s_warp_out = reinterpret_cast<float*>(smem + Smem::kWarpOut);
  float* const s_warp_stats = reinterpret_cast<float*>(smem + Smem::kWarpStats);
#pragma unroll
  for (int a = 0; a < 2; ++a) {
    const float sum = quad_sum(row_sum[a]);
    const int r = lane / 4 + 8 * a;
    float* const out_row = s_warp_out + (warp * kRows + r) * D;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt)
      *reinterpret_cast<float2*>(out_row + 8 * dt + 2 * (lane % 4)) =
          make_float2(out_acc[dt][2 * a], out_acc[dt][2 * a + 1]);
    if (lane % 4 == 0)
      *reinterpret_cast<float2*>(s_warp_stats + 2 * (warp * kRows + r)) =
          make_float2(row_max[a], sum);
  }
  __syncthreads();

  constexpr int kParts = kThreads / kRows;
  constexpr int kCols = D / kParts;
  const int r = threadIdx.x / kParts, part = threadIdx.x % kParts;
  const int row = blk.r0 + r;
  if (row >= blk.rows_total) return;
  const int64_t head = blk.kv_head * blk.group + row / blk.n_q;
  const int t = row % blk.n_q;
  const bool real = t >= blk.pad;
  float weight[kWarps], max_all = -INFINITY, sum_all = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) max_all = fmaxf(max_all, s_warp_stats[2 * (w * kRows + r)]);
  const float ref = softmax_reference(max_all, scale_log2);
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    const float2 stats = *reinterpret_cast<const float2*>(s_warp_stats + 2 * (w * kRows + r));
    weight[w] = exp2f(stats.x * scale_log2 - ref);
    sum_all += weight[w] * stats.y;
  }
  if (!real) sum_all = 0.f;
  const float inv_sum = inverse_or_zero(sum_all);
  float o[kCols];
#pragma unroll
  for (int i = 0; i < kCols; ++i) {
    float acc = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w)
      acc += weight[w] * s_warp_out[(w * kRows + r) * D + part * kCols + i];
    o[i] = real ? acc * inv_sum : 0.f;
  }
  store_row_columns<T, kCols>(dst, blk.b, head, t, part * kCols, o, part == 0,
                              log2_sum_exp(ref, sum_all));
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 2)
    lambda_attention_decode_kernel(const LambdaAttentionParams p, const int n_splits,
                                   float* __restrict__ partial_out,
                                   float* __restrict__ partial_lse) {
  extern __shared__ __align__(128) unsigned char smem[];
  const DecodeShared<T, D> sm(smem);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const DecodeBlock blk(p, n_splits);
  const KeySource<T> src(p, blk);
  // A sequence of padding rows only has no query: no chunk.
  const int n_chunks = blk.n_real > 0 ? static_cast<int>((src.n_keys + kChunk - 1) / kChunk) : 0;
  const int c_begin = n_chunks * blk.split / n_splits;  // < 2^31: see decode_eligible
  const int c_end = n_chunks * (blk.split + 1) / n_splits;

  // Prologue: the Q tile (one cp.async group), then the first kStages - 1 chunks (one group
  // each, possibly empty), all in flight together; the frequency constants meanwhile; then Q
  // rotated and held as A fragments for the whole kernel.
  stage_q_rows<T, D>(p, blk, sm.q);
  for (int st = 0; st < kStages - 1; ++st) sm.issue(src, c_begin + st, c_end, st);
  store_frequency_constants<T, D>(p, sm);
  cp_async_wait<kStages - 1>();  // the Q group
  __syncthreads();
  rotate_q_rows<T, D>(blk, sm);
  __syncthreads();
  uint32_t q_frag[D / 16][4];
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) load_q_fragment<T, D>(q_frag[ks], sm.q, ks, lane);

  const DecodeRows rows(blk, lane);
  const int last_t = blk.n_real - 1;  // the last real query
  const int n_local = static_cast<int>(min64(p.n_local, kFar));
  // Keys (as distances from the anchor) some query / every query sees locally.
  const KeyRange<int> local_to_any = local_keys_of_any(0, last_t, n_local);
  const KeyRange<int> local_to_all = local_keys_of_all(0, last_t, n_local);
  const float scale_log2 = p.scale * 1.4426950408889634f;
  float out_acc[D / 8][4] = {};
  float row_max[2] = {-INFINITY, -INFINITY};  // raw scores (unscaled)
  float row_sum[2] = {0.f, 0.f};              // this thread's share; reduced at the end
  // Rotation state of the lane's first key (slot 16 warp + 2 (lane/4) of each chunk): the
  // angles of distance prev_delta (kNoRotation: none, the next key seeds).
  LaneAngles<D> angles;
  int prev_delta = kNoRotation;
  const int info_slot = 16 * warp + (lane & 15);                 // the slot this lane describes
  const int key_row = 16 * warp + 2 * (lane % 8) + lane / 16;  // its K ldmatrix row

  for (int c = c_begin; c < c_end; ++c) {
    const int stage = (c - c_begin) % kStages;
    // Chunk c has landed (the newest group, chunk c + 1, may still be in flight), and every
    // warp is done with chunk c - 1, whose stage now takes chunk c + kStages - 1.
    cp_async_wait<kStages - 2>();
    __syncthreads();
    sm.issue(src, c + kStages - 1, c_end, (stage + kStages - 1) % kStages);
    T* const v_st = sm.v + stage * DecodeSmem<T, D>::kTile;

    const ChunkKey key(sm.pos[stage * kChunk + info_slot], blk.qs, p.n_global, last_t, n_local,
                       local_to_any, local_to_all);
    const bool need_local = __any_sync(0xffffffffu, key.seen_local);
    const bool need_global = __any_sync(0xffffffffu, key.seen_global);
    const bool all_local = __all_sync(0xffffffffu, key.all_local);
    if (!need_local && !need_global) {
      prev_delta = kNoRotation;
      continue;
    }
    zero_empty_values<T, D>(v_st, key.empty, warp, lane);

    // K as B fragments: kf[ks][2 tile + sub] = key 16 warp + 2 (lane/4) + tile, features
    // 16 ks + 8 sub + 2 (lane % 4) + {0, 1}.
    uint32_t kf[D / 16][4];
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks)
      ldmatrix_x4(kf[ks], sm.k + stage * DecodeSmem<T, D>::kTile +
                              kv_swz<D>(key_row, ks * 16 + 8 * ((lane / 8) % 2)));
    // Global scores first, from the unrotated keys: rare (the chunk holding the first
    // n_global positions).
    float acc_global[2][4] = {};
    if (need_global) global_scores<T, D>(acc_global, kf, sm.q_cap, lane);
    float acc_local[2][4] = {};
    if (need_local)
      local_scores<T, D>(acc_local, kf, q_frag, key, angles, prev_delta, sm, lane);
    else
      prev_delta = kNoRotation;

    float score[2][4];
    if (all_local) {
#pragma unroll
      for (int tile = 0; tile < 2; ++tile)
#pragma unroll
        for (int i = 0; i < 4; ++i) score[tile][i] = acc_local[tile][i];
    } else {
      select_scores(score, acc_local, acc_global, key, rows, n_local, lane);
    }
    online_softmax_step(score, row_max, row_sum, out_acc, scale_log2);
    accumulate_pv<T, D>(out_acc, score, v_st, warp, lane);
  }

  // The merge (launched as a programmatic dependent) may start its blocks now; it still waits
  // for this grid's completion before it reads a partial.
  grid_dependents_may_launch();
  const OutputRows<T> dst(p, partial_out, partial_lse, n_splits, blk.split);
  combine_warps_and_store<T, D>(dst, blk, smem, out_acc, row_max, row_sum, scale_log2, warp, lane);
}

// Combines the splits of every output row: out = sum_z 2^(lse_z - lse) O_z. A thread owns four
// columns of one row (float4 loads of the partials, one 8-byte store); the loop over splits
// keeps several independent loads in flight.
template <typename T, int D>
__global__ void __launch_bounds__(128)
    decode_merge_kernel(const LambdaAttentionParams p, const int n_splits,
                        const float* __restrict__ partial_out,
                        const float* __restrict__ partial_lse) {
  constexpr int kThreadsPerRow = D / 4;
  constexpr int kRowsPerBlock = 128 / kThreadsPerRow;
  // Output rows (b, head, t) as int32: plan_attention routes only shapes where they fit.
  const int row = blockIdx.x * kRowsPerBlock + threadIdx.x / kThreadsPerRow;
  const int col = 4 * (threadIdx.x % kThreadsPerRow);
  const int n_q = static_cast<int>(p.n_queries), n_heads = static_cast<int>(p.n_heads_q);
  wait_for_prerequisite_grid();  // the decode kernel's partials are complete and visible
  if (row >= p.batch * n_heads * n_q) return;
  const float* const lse = partial_lse + int64_t(row) * n_splits;
  const float* const partial = partial_out + int64_t(row) * n_splits * D + col;
  float lse_max = -INFINITY;
  for (int z = 0; z < n_splits; ++z) lse_max = fmaxf(lse_max, lse[z]);
  const float ref = softmax_reference(lse_max, 1.f);  // log2-sum-exps: already scaled
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  float total = 0.f;
#pragma unroll 4
  for (int z = 0; z < n_splits; ++z) {
    const float w = exp2f(lse[z] - ref);
    const float4 o = *reinterpret_cast<const float4*>(partial + z * D);
    total += w;
    acc.x += w * o.x;
    acc.y += w * o.y;
    acc.z += w * o.z;
    acc.w += w * o.w;
  }
  const float inv = inverse_or_zero(total);
  const int t = row % n_q, bh = row / n_q;
  const int64_t head = bh % n_heads, b = bh / n_heads;
  T* const out = p.out.as<T>().at(b, head, t) + col;
  *reinterpret_cast<uint2*>(out) = make_uint2(pack2<T>(acc.x * inv, acc.y * inv),
                                              pack2<T>(acc.z * inv, acc.w * inv));
}

// The kernel variant's occupancy, once per device (the dynamic shared memory limit is raised
// at the same time). Neither call is a stream operation, so both are legal during capture.
template <typename T, int D> int blocks_per_sm() {
  static std::atomic<int> cached[64] = {};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= 64) return 1;
  int blocks = cached[device].load(std::memory_order_relaxed);
  if (blocks == 0) {
    auto* kernel = lambda_attention_decode_kernel<T, D>;
    constexpr int kSmem = static_cast<int>(DecodeSmem<T, D>::kBytes);
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem) !=
            cudaSuccess ||
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kThreads, kSmem) !=
            cudaSuccess ||
        blocks < 1) {
      cudaGetLastError();  // leave no sticky error for the next launch check
      return 1;
    }
    cached[device].store(blocks, std::memory_order_relaxed);
  }
  return blocks;
}

template <typename T, int D>
Status launch(const LambdaAttentionParams& p, const AttentionPlan& plan, void* workspace,
              cudaStream_t stream) {
  constexpr int kSmem = static_cast<int>(DecodeSmem<T, D>::kBytes);
  blocks_per_sm<T, D>();  // raises the shared-memory limit on first use
  const int n_splits = static_cast<int>(plan.n_splits);
  const SplitPartials partials = split_partials(plan, workspace);
  const dim3 grid(static_cast<unsigned>(plan.row_tiles * n_splits),
                  static_cast<unsigned>(p.n_heads_kv), static_cast<unsigned>(p.batch));
  lambda_attention_decode_kernel<T, D><<<grid, kThreads, kSmem, stream>>>(p, n_splits,
                                                                         partials.out, partials.lse);
  Status status = launch_status("lambda_attention_decode_kernel");
  if (!status.ok() || n_splits == 1) return status;
  constexpr int kRowsPerBlock = 128 / (D / 4);
  const int64_t rows = p.batch * p.n_heads_q * p.n_queries;
  cudaLaunchAttribute dependent;
  dependent.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  dependent.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>((rows + kRowsPerBlock - 1) / kRowsPerBlock));
  config.blockDim = dim3(128);
  config.stream = stream;
  config.attrs = &dependent;
  config.numAttrs = 1;
  if (cudaLaunchKernelEx(&config, decode_merge_kernel<T, D>, p, n_splits,
                         static_cast<const float*>(partials.out),
                         static_cast<const float*>(partials.lse)) != cudaSuccess) {
    cudaGetLastError();  // a runtime or driver without dependent launches: an ordinary one
    decode_merge_kernel<T, D><<<config.gridDim, config.blockDim, 0, stream>>>(
        p, n_splits, partials.out, partials.lse);
  }
  return launch_status("decode_merge_kernel");
}

template <typename T, int D> struct Launcher {
  static constexpr auto run = launch<T, D>;
};

}  // namespace

int decode_blocks_per_sm(const LambdaAttentionParams& p) {
  return dispatch_kernel_types(p, [](auto t, auto d) {
    return blocks_per_sm<typename decltype(t)::type, decltype(d)::value>();
  });
}

Status launch_lambda_attention_decode(const LambdaAttentionParams& params,
                                      const AttentionPlan& plan, void* workspace,
                                      cudaStream_t stream) {
  return launch_kernel_types<Launcher>(params, params, plan, workspace, stream);
}

}  // namespace lminf::cuda
