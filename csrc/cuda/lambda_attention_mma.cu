// Λ-attention on tensor cores (bf16/fp16, head_dim 64 or 128): prefill, chunked prefill and
// decode in one kernel.
//
// A block owns up to 64 query rows and walks 64-key tiles: first the cache tiles, then the tiles
// of the chunk's own keys that the Λ band or the global keys reach (the rest are never loaded).
// Prefill: the rows are 64 consecutive queries of one head. Decode (n_queries <= 16): the rows
// are all query heads of one KV group stacked (r = head_in_group * n_queries + t), so K/V are
// read once per group, and the key tiles are split across n_splits blocks (flash-decoding)
// whose partial results lse_merge.cu combines.
//
// RoPE inside the kernel, from relative positions only. The block anchors rotations at
// q0 = position of its first query (t_lo): queries are rotated by t - t_lo (< 64), keys by
// j - q0 (> -n_local for any key the band reaches), so
//     (R_{i-q0} q) . (R_{j-q0} k) = (R_{i-j} q) . k,
// the local score, and no angle ever sees an absolute position. Global keys (j < n_global,
// i - j >= n_local) score (R_D q) . k with k unrotated: the block keeps R_D q in shared memory
// and multiplies it with the unrotated key tile, in the same pass over K/V. Per element masks
// choose the local score, the global score or -inf; tiles strictly inside the band skip them.
//
// Per key tile (three barriers): once every warp is done with the previous tile, issue the
// cp.async copies of the next one into the freed buffer (double buffering; the prologue issues
// the first two, so decode blocks with few tiles have both in flight); wait for this tile;
// rotate its in-window keys into s_krot (a recurrence along rows, exact sincos only at a lane's
// first row or after a jump in position); then every warp computes S = Q K^T (mma.sync
// m16n8k16, fragments by ldmatrix), masks, online softmax in float32 and O += P V.
#include <cuda_runtime.h>

#include <cmath>

#include "common.cuh"
#include "lambda_attention_plan.cuh"
#include "tile_list.cuh"

namespace lminf::cuda {
namespace {

constexpr int kWarps = kMmaWarps;
constexpr int kThreads = 32 * kWarps;
constexpr int BM = kMmaBlockRows;  // query rows per block
constexpr int BN = kMmaBlockKeys;  // keys per tile
static_assert(BM == BN, "the Q staging buffer doubles as the rotated-key buffer");

// Shared-memory tiles are [rows][D] with 16-byte chunks XOR-swizzled by row, so that the
// eight row addresses of every ldmatrix, and the cp.async writes, hit distinct banks.
template <int D> __device__ __forceinline__ int swz(int row, int col) {
  return row * D + ((((col >> 3) ^ (row & 7))) << 3) + (col & 7);
}

template <typename T, int D> struct SmemLayout {
  static constexpr int kTile = BN * D;  // elements of one [64][D] tile
  // q_cap [BM][D]: R_D q, the global-branch queries, for the whole kernel.
  // k_rot [BN][D]: keys rotated by j - q0; at the start, the Q staging tile.
  // k, v [2][BN][D]: the double-buffered raw tiles; pos [2][BN]: their key positions.
  // visible [kMaxSkippableCacheTiles]: whether any query of the block can see a cache tile.
  static constexpr size_t kQCap = 0;
  static constexpr size_t kKRot = kQCap + kTile * sizeof(T);
  static constexpr size_t kK = kKRot + kTile * sizeof(T);
  static constexpr size_t kV = kK + 2 * kTile * sizeof(T);
  static constexpr size_t kPos = kV + 2 * kTile * sizeof(T);
  static constexpr size_t kVisible = kPos + 2 * BN * sizeof(int64_t);
  static constexpr size_t kBytes = kVisible + kMaxSkippableCacheTiles;
};

// Issues the cp.async copies of one key tile (keys, values, positions) into stage buffers.
// Missing rows are zero-filled and get position -1, so they are masked and add 0 * 0 to P V.
template <typename T, int D>
__device__ __forceinline__ void load_key_tile(const LambdaAttentionParams& p, int64_t b,
                                              int64_t kv_head, int64_t qs, KeyTile tile, T* s_k,
                                              T* s_v, int64_t* s_pos) {
  constexpr int kChunks = D / 8;
  const T* k_base;
  const T* v_base;
  int64_t k_row_stride, v_row_stride, n_rows;
  if (tile.from_cache) {
    k_base = static_cast<const T*>(p.cache_k) + b * p.cache_k_batch_stride +
             kv_head * p.cache_k_head_stride;
    v_base = static_cast<const T*>(p.cache_v) + b * p.cache_v_batch_stride +
             kv_head * p.cache_v_head_stride;
    k_row_stride = p.cache_k_row_stride;
    v_row_stride = p.cache_v_row_stride;
    n_rows = p.cache_len;
  } else {
    k_base = static_cast<const T*>(p.k) + b * p.k_batch_stride + kv_head * p.k_head_stride;
    v_base = static_cast<const T*>(p.v) + b * p.v_batch_stride + kv_head * p.v_head_stride;
    k_row_stride = p.k_row_stride;
    v_row_stride = p.v_row_stride;
    n_rows = p.n_queries;
  }
  for (int c = threadIdx.x; c < BN * kChunks; c += kThreads) {
    const int r = c / kChunks, chunk = c % kChunks;
    const int64_t row = tile.first + r;
    const bool valid = row < n_rows;
    const int dst = swz<D>(r, chunk * 8);
    cp_async_16(s_k + dst, valid ? k_base + row * k_row_stride + chunk * 8 : k_base, valid);
    cp_async_16(s_v + dst, valid ? v_base + row * v_row_stride + chunk * 8 : v_base, valid);
  }
  if (threadIdx.x < BN) {
    const int64_t row = tile.first + threadIdx.x;
    if (!tile.from_cache) {
      s_pos[threadIdx.x] = row < n_rows ? qs + row : -1;
    } else if (row < n_rows) {
      cp_async_8(s_pos + threadIdx.x, p.cache_positions + row);
    } else {
      s_pos[threadIdx.x] = -1;
    }
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 2)
    lambda_attention_mma_kernel(const LambdaAttentionParams p, const AttentionPlan plan,
                                float* partial_out, float* partial_lse,
                                const int64_t* cache_tile_bounds) {
  constexpr int kChunks = D / 8;       // 16-byte chunks per row
  constexpr int kKSteps = D / 16;      // k16 steps of Q K^T
  constexpr int kKeySteps = BN / 16;   // k16 steps of P V
  constexpr int kNTiles = BN / 8;      // n8 tiles of S
  constexpr int kDTiles = D / 8;       // n8 tiles of O
  // Rotations: a lane owns the frequency pair (f, f + 1), f = 2 * (lane % kLanesPerRow), and
  // moves it as one 32-bit word; a warp covers kRowsPerPass rows at once (2 for head_dim 64).
  constexpr int kLanesPerRow = D / 4 < 32 ? D / 4 : 32;
  constexpr int kRowsPerPass = 32 / kLanesPerRow;
  constexpr int kRowStep = kWarps * kRowsPerPass;  // rows between a lane's successive rows
  using Layout = SmemLayout<T, D>;

  extern __shared__ __align__(128) unsigned char smem[];
  T* const s_qcap = reinterpret_cast<T*>(smem + Layout::kQCap);
  T* const s_krot = reinterpret_cast<T*>(smem + Layout::kKRot);
  T* const s_k = reinterpret_cast<T*>(smem + Layout::kK);
  T* const s_v = reinterpret_cast<T*>(smem + Layout::kV);
  int64_t* const s_pos = reinterpret_cast<int64_t*>(smem + Layout::kPos);
  uint8_t* const s_visible = smem + Layout::kVisible;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t n_splits = plan.n_splits;
  const int64_t split = blockIdx.x % n_splits;
  // Heaviest row tiles (latest queries: the full band) first, for a balanced tail.
  const int64_t row_tile = plan.row_tiles - 1 - blockIdx.x / n_splits;
  const int64_t b = blockIdx.z;
  const int64_t n_q = p.n_queries;
  const int64_t heads = plan.heads_per_block;
  const int64_t rows_total = heads * n_q;
  const int64_t r0 = row_tile * BM;
  const int64_t head0 = blockIdx.y * heads;
  const int64_t kv_head = head0 / (p.n_heads_q / p.n_heads_kv);
  const int64_t qs = *p.query_start;

  // Query range of the block (chunk-relative t); stacked heads span every t.
  const int64_t t_lo = heads == 1 ? r0 : 0;
  const int64_t t_hi = heads == 1 ? min64(r0 + BM, n_q) - 1 : n_q - 1;
  const int64_t q0 = qs + t_lo;  // the rotation anchor

  const TileList<BN> tiles(p, qs, t_lo, t_hi);
  const int64_t tile_begin = tiles.count * split / n_splits;
  const int64_t tile_end = tiles.count * (split + 1) / n_splits;
  // Tiles to load and compute: all but the cache tiles found invisible (see below).
  const auto tile_needed = [&](KeyTile tile) {
    return !tile.from_cache || cache_tile_bounds == nullptr || s_visible[tile.first / BN] != 0;
  };

  // Stage the Q tile in s_krot and the first two key tiles in stages 0 and 1 (three cp.async
  // groups, some possibly empty), so that both key loads are in flight from the start.
  {
    const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride;
    for (int c = threadIdx.x; c < BM * kChunks; c += kThreads) {
      const int r = c / kChunks, chunk = c % kChunks;
      const int64_t row = r0 + r;
      const bool valid = row < rows_total;
      const T* src = valid ? q + (head0 + row / n_q) * p.q_head_stride +
                                 (row % n_q) * p.q_row_stride + chunk * 8
                           : q;
      cp_async_16(s_krot + swz<D>(r, chunk * 8), src, valid);
    }
    cp_async_commit();
    if (cache_tile_bounds != nullptr) {
      // A cache tile is visible if some query i in [i_lo, i_hi] could see some position in its
      // [lo, hi] locally (i - j in [0, n_local)) or as a global key (j < n_global, i - j >=
      // n_local): a conservative test, exact for the empty tiles of a fresh ring.
      const int64_t i_lo = qs + t_lo, i_hi = qs + t_hi;
      for (int64_t tile = threadIdx.x; tile < tiles.cache_tiles; tile += kThreads) {
        const int64_t lo = cache_tile_bounds[2 * tile], hi = cache_tile_bounds[2 * tile + 1];
        s_visible[tile] = hi >= 0 && ((hi > i_lo - p.n_local && lo <= i_hi) ||
                                      (lo < p.n_global && i_hi - lo >= p.n_local));
      }
      __syncthreads();
    }
    for (int st = 0; st < 2; ++st) {
      if (tile_begin + st < tile_end && tile_needed(tiles[tile_begin + st]))
        load_key_tile<T, D>(p, b, kv_head, qs, tiles[tile_begin + st], s_k + st * Layout::kTile,
                            s_v + st * Layout::kTile, s_pos + st * BN);
      cp_async_commit();
    }
  }

  // Per-lane rotary constants for the pair (f, f + 1). plan_attention sends rotary_dim % 4 != 0
  // to the generic kernel, so a lane rotates both frequencies of its pair or neither.
  const int half = static_cast<int>(p.rotary_dim / 2);
  const int pair_lane = lane % kLanesPerRow;
  const int f = 2 * pair_lane;
  const bool rotates = f < half;
  const int first_row = warp + kWarps * (lane / kLanesPerRow);  // the lane's first row
  float inv_freq[2] = {0.f, 0.f}, step_cos[2], step_sin[2], cap_cos[2], cap_sin[2];
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    if (rotates) inv_freq[e] = p.inv_freq[f + e];
    rope_sincos(kRowStep, inv_freq[e], &step_cos[e], &step_sin[e]);
    rope_sincos(p.distance_cap, inv_freq[e], &cap_cos[e], &cap_sin[e]);
  }

  // Rotate the staged Q rows: s_krot <- R_{t - t_lo} q (local), s_qcap <- R_D q (global).
  cp_async_wait<2>();  // the Q group
  __syncthreads();
  for (int r = first_row; r < BM; r += kRowStep) {
    const int64_t row = r0 + r;
    if (row >= rows_total) {  // padding row: zero (its Q was zero-filled)
      for (int chunk = pair_lane; chunk < kChunks; chunk += kLanesPerRow)
        *reinterpret_cast<uint4*>(s_qcap + r * D + chunk * 8) = make_uint4(0, 0, 0, 0);
      continue;
    }
    if (rotates) {
      float c[2], s[2];
      rope_sincos(row % n_q - t_lo, inv_freq[0], &c[0], &s[0]);
      rope_sincos(row % n_q - t_lo, inv_freq[1], &c[1], &s[1]);
      uint32_t* const lo = reinterpret_cast<uint32_t*>(s_krot + swz<D>(r, f));
      uint32_t* const hi = reinterpret_cast<uint32_t*>(s_krot + swz<D>(r, f + half));
      const float2 x1 = unpack2<T>(*lo), x2 = unpack2<T>(*hi);
      *lo = pack2<T>(x1.x * c[0] - x2.x * s[0], x1.y * c[1] - x2.y * s[1]);
      *hi = pack2<T>(x2.x * c[0] + x1.x * s[0], x2.y * c[1] + x1.y * s[1]);
      *reinterpret_cast<uint32_t*>(s_qcap + swz<D>(r, f)) =
          pack2<T>(x1.x * cap_cos[0] - x2.x * cap_sin[0], x1.y * cap_cos[1] - x2.y * cap_sin[1]);
      *reinterpret_cast<uint32_t*>(s_qcap + swz<D>(r, f + half)) =
          pack2<T>(x2.x * cap_cos[0] + x1.x * cap_sin[0], x2.y * cap_cos[1] + x1.y * cap_sin[1]);
    }
    for (int col = 2 * half + f; col < D; col += 2 * kLanesPerRow)  // features past rotary_dim
      *reinterpret_cast<uint32_t*>(s_qcap + swz<D>(r, col)) =
          *reinterpret_cast<const uint32_t*>(s_krot + swz<D>(r, col));
  }
  __syncthreads();

  // This warp's 16 rows: Q (local rotation) as mma A fragments for the whole kernel.
  uint32_t q_frag[kKSteps][4];
#pragma unroll
  for (int ks = 0; ks < kKSteps; ++ks)
    ldmatrix_x4(q_frag[ks], s_krot + swz<D>(warp * 16 + (lane % 8) + 8 * ((lane / 8) % 2),
                                            ks * 16 + 8 * (lane / 16)));

  // The two rows this thread holds in every accumulator fragment: warp row lane/4 and +8.
  const int64_t warp_row0 = r0 + warp * 16;
  const bool warp_active = warp_row0 < rows_total;
  bool row_valid[2];
  int64_t row_head[2], row_t[2], row_pos[2];
#pragma unroll
  for (int a = 0; a < 2; ++a) {
    const int64_t row = warp_row0 + lane / 4 + 8 * a;
    row_valid[a] = row < rows_total;
    row_head[a] = head0 + (row_valid[a] ? row / n_q : 0);
    row_t[a] = row_valid[a] ? row % n_q : 0;
    row_pos[a] = qs + row_t[a];
  }
  // Query range of the warp, for the test "every pair of this tile is local".
  const int64_t warp_t_lo = heads == 1 ? warp_row0 : 0;
  const int64_t warp_t_hi = heads == 1 ? min64(warp_row0 + 15, n_q - 1) : n_q - 1;

  float out_acc[kDTiles][4] = {};
  float row_max[2] = {-INFINITY, -INFINITY};  // raw scores (unscaled)
  float row_sum[2] = {0.f, 0.f};              // this thread's share; reduced at the end
  const float scale_log2 = p.scale * 1.4426950408889634f;
  const int64_t n_local = p.n_local, n_global = p.n_global;

  __syncthreads();  // every warp holds its Q fragments: s_krot is free for keys

  for (int64_t it = tile_begin; it < tile_end; ++it) {
    const int stage = static_cast<int>((it - tile_begin) & 1);
    T* const k_st = s_k + stage * Layout::kTile;
    T* const v_st = s_v + stage * Layout::kTile;
    const int64_t* const pos_st = s_pos + stage * BN;
    const KeyTile tile = tiles[it];

    // Double buffer: tile it + 1 goes into the stage tile it - 1 used, as soon as every warp is
    // done with it (tile it + 1 was issued by the prologue when it == tile_begin).
    if (it > tile_begin) {
      __syncthreads();
      if (it + 1 < tile_end && tile_needed(tiles[it + 1]))
        load_key_tile<T, D>(p, b, kv_head, qs, tiles[it + 1], s_k + (stage ^ 1) * Layout::kTile,
                            s_v + (stage ^ 1) * Layout::kTile, s_pos + (stage ^ 1) * BN);
      cp_async_commit();
    }
    if (!tile_needed(tile)) continue;  // never loaded; the same in every thread
    cp_async_wait<1>();  // tile it has landed (the latest group, tile it + 1, may be in flight)
    __syncthreads();

    // Prepare the tile. A lane visits rows first_row, first_row + kRowStep, ...: consecutive
    // positions then differ by kRowStep, and the next row's rotation is one complex multiply
    // away. Rows outside the block's window (-n_local, t_hi - t_lo] are never local here and
    // stay unrotated.
    {
      int64_t prev_delta = 0;
      bool have_prev = false;
      float c[2], s[2];
      for (int r = first_row; r < BN; r += kRowStep) {
        const int64_t j = pos_st[r];
        if (j < 0) {  // empty slot: its value row may hold anything, and 0 * NaN is NaN
          for (int chunk = pair_lane; chunk < kChunks; chunk += kLanesPerRow)
            *reinterpret_cast<uint4*>(v_st + r * D + chunk * 8) = make_uint4(0, 0, 0, 0);
          have_prev = false;
          continue;
        }
        const int64_t delta = j - q0;
        if (delta <= -n_local || delta > t_hi - t_lo) {
          have_prev = false;
          continue;
        }
        if (rotates) {
          const bool step = have_prev && delta == prev_delta + kRowStep;
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            if (step) {
              const float next_c = c[e] * step_cos[e] - s[e] * step_sin[e];
              s[e] = s[e] * step_cos[e] + c[e] * step_sin[e];
              c[e] = next_c;
            } else {
              rope_sincos(delta, inv_freq[e], &c[e], &s[e]);
            }
          }
          const float2 x1 = unpack2<T>(*reinterpret_cast<const uint32_t*>(k_st + swz<D>(r, f)));
          const float2 x2 =
              unpack2<T>(*reinterpret_cast<const uint32_t*>(k_st + swz<D>(r, f + half)));
          *reinterpret_cast<uint32_t*>(s_krot + swz<D>(r, f)) =
              pack2<T>(x1.x * c[0] - x2.x * s[0], x1.y * c[1] - x2.y * s[1]);
          *reinterpret_cast<uint32_t*>(s_krot + swz<D>(r, f + half)) =
              pack2<T>(x2.x * c[0] + x1.x * s[0], x2.y * c[1] + x1.y * s[1]);
        }
        for (int col = 2 * half + f; col < D; col += 2 * kLanesPerRow)
          *reinterpret_cast<uint32_t*>(s_krot + swz<D>(r, col)) =
              *reinterpret_cast<const uint32_t*>(k_st + swz<D>(r, col));
        prev_delta = delta;
        have_prev = true;
      }
    }
    __syncthreads();  // s_krot and the zeroed value rows are ready
    if (!warp_active) continue;

    // Which (row, key) pairs are local or global: bit 4 n + 2 a + e is accumulator element
    // (row lane/4 + 8a, key 8n + 2(lane%4) + e), the fragment order of mma's C.
    uint32_t local_bits = 0, global_bits = 0;
    const bool all_local = !tile.from_cache && tile.first + BN <= n_q &&
                           tile.first + BN - 1 <= warp_t_lo && warp_t_hi - tile.first < n_local;
    if (all_local) {
      local_bits = ~0u;
    } else {
#pragma unroll
      for (int n = 0; n < kNTiles; ++n) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int64_t j = pos_st[8 * n + 2 * (lane % 4) + e];
#pragma unroll
          for (int a = 0; a < 2; ++a) {
            const int64_t d = row_pos[a] - j;
            if (!row_valid[a] || j < 0 || d < 0) continue;
            const uint32_t bit = 1u << (4 * n + 2 * a + e);
            if (d < n_local) local_bits |= bit;
            else if (j < n_global) global_bits |= bit;
          }
        }
      }
    }
    const bool need_local = __any_sync(0xffffffffu, local_bits != 0);
    const bool need_global = __any_sync(0xffffffffu, global_bits != 0);
    if (!need_local && !need_global) continue;

    // S = Q K^T, sixteen keys (two n8 tiles) at a time.
    float score[kNTiles][4];
#pragma unroll
    for (int np = 0; np < kNTiles / 2; ++np) {
      float acc_local[2][4] = {}, acc_global[2][4] = {};
      const int key_row = np * 16 + (lane % 8) + 8 * (lane / 16);
      if (need_local) {
#pragma unroll
        for (int ks = 0; ks < kKSteps; ++ks) {
          uint32_t kf[4];
          ldmatrix_x4(kf, s_krot + swz<D>(key_row, ks * 16 + 8 * ((lane / 8) % 2)));
          mma_16816<T>(acc_local[0], q_frag[ks], kf[0], kf[1]);
          mma_16816<T>(acc_local[1], q_frag[ks], kf[2], kf[3]);
        }
      }
      if (need_global) {  // rare: tiles holding global keys; R_D q comes from shared memory
#pragma unroll
        for (int ks = 0; ks < kKSteps; ++ks) {
          uint32_t qf[4], kf[4];
          ldmatrix_x4(qf, s_qcap + swz<D>(warp * 16 + (lane % 8) + 8 * ((lane / 8) % 2),
                                          ks * 16 + 8 * (lane / 16)));
          ldmatrix_x4(kf, k_st + swz<D>(key_row, ks * 16 + 8 * ((lane / 8) % 2)));
          mma_16816<T>(acc_global[0], qf, kf[0], kf[1]);
          mma_16816<T>(acc_global[1], qf, kf[2], kf[3]);
        }
      }
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const uint32_t bit = 1u << (4 * (2 * np + h) + e);
          score[2 * np + h][e] = (local_bits & bit)    ? acc_local[h][e]
                                 : (global_bits & bit) ? acc_global[h][e]
                                                       : -INFINITY;
        }
    }

    // Online softmax in float32 (exp2 domain). A row with nothing visible yet keeps max -inf;
    // it then uses 0 as the reference so that exp2(-inf) gives 0 rather than NaN.
#pragma unroll
    for (int a = 0; a < 2; ++a) {
      float tile_max = -INFINITY;
#pragma unroll
      for (int n = 0; n < kNTiles; ++n)
        tile_max = fmaxf(tile_max, fmaxf(score[n][2 * a], score[n][2 * a + 1]));
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
      const float new_max = fmaxf(row_max[a], tile_max);
      const float ref = new_max == -INFINITY ? 0.f : new_max * scale_log2;
      const float correction = exp2f(row_max[a] * scale_log2 - ref);
      row_max[a] = new_max;
      row_sum[a] *= correction;
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt) {
        out_acc[dt][2 * a] *= correction;
        out_acc[dt][2 * a + 1] *= correction;
      }
#pragma unroll
      for (int n = 0; n < kNTiles; ++n)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float prob = exp2f(fmaf(score[n][2 * a + e], scale_log2, -ref));
          score[n][2 * a + e] = prob;
          row_sum[a] += prob;
        }
    }

    // O += P V: the S accumulators of two n8 tiles are exactly an A fragment of m16n8k16.
#pragma unroll
    for (int kk = 0; kk < kKeySteps; ++kk) {
      const uint32_t pf[4] = {pack2<T>(score[2 * kk][0], score[2 * kk][1]),
                              pack2<T>(score[2 * kk][2], score[2 * kk][3]),
                              pack2<T>(score[2 * kk + 1][0], score[2 * kk + 1][1]),
                              pack2<T>(score[2 * kk + 1][2], score[2 * kk + 1][3])};
#pragma unroll
      for (int dp = 0; dp < kDTiles / 2; ++dp) {
        uint32_t vf[4];
        ldmatrix_x4_trans(vf, v_st + swz<D>(kk * 16 + (lane % 8) + 8 * ((lane / 8) % 2),
                                            dp * 16 + 8 * (lane / 16)));
        mma_16816<T>(out_acc[2 * dp], pf, vf[0], vf[1]);
        mma_16816<T>(out_acc[2 * dp + 1], pf, vf[2], vf[3]);
      }
    }
  }

  if (!warp_active) return;
  // Epilogue: finish the row sums across the quad that shares each row, normalise, store.
#pragma unroll
  for (int a = 0; a < 2; ++a) {
    float sum = row_sum[a];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    if (!row_valid[a]) continue;
    const float inv_sum = sum > 0.f ? 1.f / sum : 0.f;
    const int64_t out_row = (b * p.n_heads_q + row_head[a]) * n_q + row_t[a];
    if (n_splits == 1) {
      T* out = static_cast<T*>(p.out) + b * p.out_batch_stride + row_head[a] * p.out_head_stride +
               row_t[a] * p.out_row_stride;
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt) {
        const int col = 8 * dt + 2 * (lane % 4);
        *reinterpret_cast<uint32_t*>(out + col) =
            pack2<T>(out_acc[dt][2 * a] * inv_sum, out_acc[dt][2 * a + 1] * inv_sum);
      }
    } else {
      float* out = partial_out + (out_row * n_splits + split) * D;
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt) {
        const int col = 8 * dt + 2 * (lane % 4);
        *reinterpret_cast<float2*>(out + col) =
            make_float2(out_acc[dt][2 * a] * inv_sum, out_acc[dt][2 * a + 1] * inv_sum);
      }
      if (lane % 4 == 0)
        partial_lse[out_row * n_splits + split] =
            sum > 0.f ? row_max[a] * scale_log2 + log2f(sum) : -INFINITY;
    }
  }
}

template <typename T, int D>
Status launch(const LambdaAttentionParams& params, const AttentionPlan& plan, void* workspace,
              cudaStream_t stream) {
  constexpr size_t kSmem = SmemLayout<T, D>::kBytes;
  auto* kernel = lambda_attention_mma_kernel<T, D>;
  // Setting the attribute is not a stream operation, so it is allowed during graph capture.
  cudaError_t error =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(kSmem));
  if (error != cudaSuccess)
    return Status(StatusCode::kCudaError,
                  std::string("lambda_attention: cudaFuncSetAttribute failed: ") +
                      cudaGetErrorString(error));
  float* partial_out = nullptr;
  float* partial_lse = nullptr;
  const int64_t* cache_tile_bounds = nullptr;
  if (plan.n_splits > 1) {
    partial_out = static_cast<float*>(workspace);
    partial_lse = reinterpret_cast<float*>(static_cast<char*>(workspace) + plan.partial_lse_offset);
  }
  if (plan.skip_cache_tiles)
    cache_tile_bounds = reinterpret_cast<const int64_t*>(static_cast<char*>(workspace) +
                                                         plan.cache_tile_bounds_offset);
  const dim3 grid(static_cast<unsigned>(plan.row_tiles * plan.n_splits),
                  static_cast<unsigned>(params.n_heads_q / plan.heads_per_block),
                  static_cast<unsigned>(params.batch));
  kernel<<<grid, kThreads, kSmem, stream>>>(params, plan, partial_out, partial_lse,
                                            cache_tile_bounds);
  return launch_status("lambda_attention_mma_kernel");
}

}  // namespace

Status launch_lambda_attention_mma(const LambdaAttentionParams& params, const AttentionPlan& plan,
                                   void* workspace, cudaStream_t stream) {
  const bool bf16 = params.dtype == DType::kBFloat16;
  if (params.head_dim == 64)
    return bf16 ? launch<__nv_bfloat16, 64>(params, plan, workspace, stream)
                : launch<__half, 64>(params, plan, workspace, stream);
  return bf16 ? launch<__nv_bfloat16, 128>(params, plan, workspace, stream)
              : launch<__half, 128>(params, plan, workspace, stream);
}

}  // namespace lminf::cuda
