// Λ-attention on tensor cores (bf16/fp16, head_dim 64 or 128): whole sequences and chunks
// against a cache, after the pre-pass of rotate_chunk_keys.cu.
//
// Anchor a = the sequence's start (the position of its first real row; a batch row's leading
// padding rows are no keys and output zeros). The pre-pass has rotated every key a query of the
// chunk can see locally by j - a and laid them out as one key sequence, row u at position
// a - W + u (W = window_rows: the cache window gathered by position, then the chunk's real
// rows), and gathered
// the raw global keys (positions j < n_global) into a global tile. The kernel rotates its Q
// tile once by i - a and forms R_D q once, so that
//     local  (i - j < L):            (R_{i-a} q) . (R_{j-a} k) = (R_{i-j} q) . k
//     global (j < G, i - j >= L):    (R_D q) . k
// and its key loop is a plain sliding-window FlashAttention loop: no rotation, no int64
// arithmetic, and the score select only on mixed tiles (band edges, the global tiles, window
// tiles with empty slots, the chunk's last tile).
//
// A block owns 64 consecutive queries of one head and walks 64-key tiles: the global tiles,
// then the band's tiles of the key sequence (window tiles the pre-pass found empty are never
// loaded). Few blocks: the tiles are split across n_splits blocks whose partial results
// lse_merge.cu combines. Per tile, two barriers: once every warp is done with the previous
// tile, issue the cp.async copies of the next one into the freed buffer; wait for this tile;
// then every warp computes S = Q K^T (mma.sync m16n8k16, fragments by ldmatrix), masks if the
// tile is mixed, runs the online softmax in float32 and accumulates O += P V.
#include <cuda_runtime.h>

#include <climits>
#include <cmath>

#include "common.cuh"
#include "epilogue.cuh"
#include "fragment.cuh"
#include "lambda_attention_plan.cuh"
#include "lminf/lambda_mask.h"
#include "prefill_tile_list.cuh"
#include "softmax.cuh"

namespace lminf::cuda {
namespace {

constexpr int kWarps = kMmaWarps;
constexpr int kThreads = 32 * kWarps;
constexpr int BM = kMmaBlockRows;  // query rows per block
constexpr int BN = kMmaBlockKeys;  // keys per tile

// Shared-memory tiles are [rows][D] with 16-byte chunks XOR-swizzled by row, so that the
// eight row addresses of every ldmatrix, and the cp.async writes, hit distinct banks.
template <int D> __device__ __forceinline__ int swz(int row, int col) {
  return row * D + ((((col >> 3) ^ (row & 7))) << 3) + (col & 7);
}

template <typename T, int D> struct SmemLayout {
  static constexpr int kQTile = BM * D;
  static constexpr int kKTile = BN * D;
  // q_cap [BM][D]: R_D q, the global tiles' queries, for the whole kernel.
  // q [BM][D]: the staged Q tile, rotated by t in place; read into registers before the loop.
  // k, v [2][BN][D]: the double-buffered key and value tiles; valid [2][BN]: whether each
  // key row holds a key (an empty window slot, a missing global position, or past the chunk
  // does not).
  static constexpr size_t kQCap = 0;
  static constexpr size_t kQ = kQCap + kQTile * sizeof(T);
  static constexpr size_t kK = kQ + kQTile * sizeof(T);
  static constexpr size_t kV = kK + 2 * kKTile * sizeof(T);
  static constexpr size_t kValid = kV + 2 * kKTile * sizeof(T);
  static constexpr size_t kBytes = kValid + 2 * BN;
};

// Where one (batch, kv head)'s pre-pass rows and the chunk's values live.
template <typename T, int D> struct KeySource {
  const T* keys;           // [W + n_queries][D] rotated key sequence
  const T* window_values;  // [W][D]
  RowsView<const T> chunk_values;  // v at (b, kv head), from the first real row
  const T* global_keys;    // [global_rows][D] raw
  const T* global_values;  // [global_rows][D]
  const int32_t* window_slot;    // [W] cache slot or -1
  const int32_t* global_source;  // [global_rows] source or -1
  const uint8_t* window_tile_state;  // [W / BN]
  int window_rows, chunk_rows;  // chunk_rows: the real rows (key row W + t' is chunk row pad + t')

  __device__ KeySource(const LambdaAttentionParams& p, const PrefillWorkspace& ws,
                       const unsigned char* workspace, int64_t b, int64_t kv_head, int pad) {
    const int64_t head_rows = b * p.n_heads_kv + kv_head;
    const int64_t index_row = ws.index_row(b);
    window_rows = static_cast<int>(ws.window_rows);
    chunk_rows = static_cast<int>(p.n_queries) - pad;
    keys = reinterpret_cast<const T*>(workspace + ws.keys) +
           head_rows * (window_rows + p.n_queries) * D;
    window_values = reinterpret_cast<const T*>(workspace + ws.values) + head_rows * window_rows * D;
    global_keys = reinterpret_cast<const T*>(workspace + ws.global_keys) +
                  head_rows * ws.global_rows * D;
    global_values = reinterpret_cast<const T*>(workspace + ws.global_values) +
                    head_rows * ws.global_rows * D;
    chunk_values = p.v.as<const T>().rows(b, kv_head);
    chunk_values.data = chunk_values.row(pad);  // the first real row
    // The sequence's index rows, formed once (opaque: not re-derived per tile).
    window_slot = opaque(reinterpret_cast<const int32_t*>(workspace + ws.window_slot) +
                         index_row * window_rows);
    global_source = opaque(reinterpret_cast<const int32_t*>(workspace + ws.global_source) +
                           index_row * ws.global_rows);
    window_tile_state =
        opaque(workspace + ws.window_tile_state + index_row * (window_rows / BN));
  }

  // Window tiles without a single cache slot are never loaded.
  __device__ bool needed(PrefillTile tile) const {
    return tile.global || tile.first >= window_rows ||
           window_tile_state[tile.first / BN] != kTileEmpty;
  }
  // No select needed for the pairs the band covers: every row holds a key.
  __device__ bool full(PrefillTile tile) const {
    return !tile.global && (tile.first >= window_rows
                                ? tile.first + BN <= window_rows + chunk_rows
                                : window_tile_state[tile.first / BN] == kTileFull);
  }

  // Issues the cp.async copies of one tile. Rows past the chunk are zero-filled; the pre-pass
  // wrote zeros for empty window slots and missing global positions. The tile's base
  // addresses are chosen once, so a copy costs one multiply-add and a compare.
  __device__ void load(PrefillTile tile, T* s_k, T* s_v, uint8_t* s_valid) const {
    constexpr int kChunks = D / 8;
    static_assert(BN * kChunks % kThreads == 0 && kThreads % kChunks == 0,
                  "every thread copies the same 16-byte column of kCopies rows");
    constexpr int kCopies = BN * kChunks / kThreads;
    const T* k_base;
    const T* v_base;
    int64_t v_stride = D;
    int rows = BN;  // rows of the tile that hold data
    if (tile.global) {
      k_base = global_keys + tile.first * D;
      v_base = global_values + tile.first * D;
    } else if (tile.first < window_rows) {  // the window is a whole number of tiles
      k_base = keys + tile.first * D;
      v_base = window_values + tile.first * D;
    } else {
      k_base = keys + tile.first * D;
      v_base = chunk_values.row(tile.first - window_rows);
      v_stride = chunk_values.row_stride;
      rows = window_rows + chunk_rows - tile.first;
    }
    const int col = (threadIdx.x % kChunks) * 8;
#pragma unroll
    for (int i = 0; i < kCopies; ++i) {
      const int r = threadIdx.x / kChunks + i * (kThreads / kChunks);
      const bool valid = r < rows;
      const int dst = swz<D>(r, col);
      cp_async_16(s_k + dst, valid ? k_base + r * D + col : keys, valid);
      cp_async_16(s_v + dst, valid ? v_base + r * v_stride + col : chunk_values.data, valid);
    }
    if (threadIdx.x < BN) {
      const int row = tile.first + threadIdx.x;
      s_valid[threadIdx.x] = tile.global          ? global_source[row] >= 0
                             : row < window_rows ? window_slot[row] >= 0
                                                 : row < window_rows + chunk_rows;
    }
  }
};

// The double-buffered key and value stages in shared memory. Tile `it` of the list goes into
// stage (it - tile_begin) % 2.
template <typename T, int D> struct KeyStages {
  T* k;            // [2][BN][D]
  T* v;            // [2][BN][D]
  uint8_t* valid;  // [2][BN]

  // Issues the copies of tile `it` into `stage` when the block visits it and it is not an empty
  // window tile; always one cp.async group (possibly empty), so that the wait counts hold.
  __device__ void issue(const KeySource<T, D>& src, const PrefillTileList<BN>& tiles, int it,
                        int tile_end, int stage) const {
    if (it < tile_end && src.needed(tiles[it]))
      src.load(tiles[it], k + stage * SmemLayout<T, D>::kKTile,
               v + stage * SmemLayout<T, D>::kKTile, valid + stage * BN);
    cp_async_commit();
  }
};

// Copies the block's Q rows [t_lo, t_lo + BM) of (b, head) into s_q (one cp.async group; rows
// past the chunk are zero-filled).
template <typename T, int D>
__device__ __forceinline__ void stage_q_tile(const LambdaAttentionParams& p, int64_t b,
                                             int64_t head, int t_lo, T* s_q) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  const int n_q = static_cast<int>(p.n_queries);
  const RowsView<const T> q = p.q.as<const T>().rows(b, head);
  for (int c = threadIdx.x; c < BM * kChunks; c += kThreads) {
    const int r = c / kChunks, col = (c % kChunks) * 8;
    const bool valid = t_lo + r < n_q;
    cp_async_16(s_q + swz<D>(r, col), valid ? q.row(t_lo + r) + col : q.data, valid);
  }
  cp_async_commit();
}

// Rotates the staged Q rows in place, s_q <- R_t q (local; t = i - a, the row's real index),
// and writes s_qcap <- R_D q (global). A lane owns the frequency pair (f, f + 1), f = 2 (lane %
// kLanesPerRow), as one 32-bit word; a warp covers 32 / kLanesPerRow rows at once (2 for
// head_dim 64). plan_attention sends rotary_dim % 4 != 0 to the generic kernel, so a lane
// rotates both frequencies of its pair or neither. Constructed before the wait for Q, so that
// R_D's angles overlap the copies.
template <typename T, int D> struct QTileRotation {
  static constexpr int kLanesPerRow = D / 4 < 32 ? D / 4 : 32;
  static constexpr int kRowStep = kWarps * (32 / kLanesPerRow);
  int half, f;
  bool rotates;
  float inv_freq[2] = {0.f, 0.f}, cap_cos[2], cap_sin[2];

  __device__ QTileRotation(const LambdaAttentionParams& p, int lane)
      : half(static_cast<int>(p.rotary_dim / 2)), f(2 * (lane % kLanesPerRow)), rotates(f < half) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      if (rotates) inv_freq[e] = p.inv_freq[f + e];
      rope_sincos(p.distance_cap, inv_freq[e], &cap_cos[e], &cap_sin[e]);
    }
  }

  // Row r of the tile is real row first_t + r (padding rows: unused).
  __device__ void rotate(T* s_q, T* s_qcap, int first_t, int warp, int lane) const {
    for (int r = warp + kWarps * (lane / kLanesPerRow); r < BM; r += kRowStep) {
      if (rotates) {
        float c[2], s[2];
        rope_sincos(first_t + r, inv_freq[0], &c[0], &s[0]);
        rope_sincos(first_t + r, inv_freq[1], &c[1], &s[1]);
        rotate_query_pair<T>(reinterpret_cast<uint32_t*>(s_q + swz<D>(r, f)),
                             reinterpret_cast<uint32_t*>(s_q + swz<D>(r, f + half)),
                             reinterpret_cast<uint32_t*>(s_qcap + swz<D>(r, f)),
                             reinterpret_cast<uint32_t*>(s_qcap + swz<D>(r, f + half)), c, s,
                             cap_cos, cap_sin);
      }
      for (int col = 2 * half + f; col < D; col += 2 * kLanesPerRow)  // past rotary_dim
        *reinterpret_cast<uint32_t*>(s_qcap + swz<D>(r, col)) =
            *reinterpret_cast<const uint32_t*>(s_q + swz<D>(r, col));
    }
  }
};

// Element index (swizzled) of the address lane `lane` gives ldmatrix for k16 step ks of the
// warp's 16 rows of a [BM][D] Q tile (an A fragment).
template <int D> __device__ __forceinline__ int q_fragment_at(int warp, int lane, int ks) {
  return swz<D>(warp * 16 + (lane % 8) + 8 * ((lane / 8) % 2), ks * 16 + 8 * (lane / 16));
}

// The keys the two rows of a thread's accumulators (warp rows lane / 4 and + 8) see, as rows of
// the pre-pass: locally the key rows local[h] (real row t' = t - pad is key row W + t'),
// globally the global rows [0, global_last[h]]. Padding rows and rows past the chunk see
// nothing.
struct FragmentRows {
  int row_t[2];  // chunk rows (padding counted)
  KeyRange<int> local[2];
  int global_last[2];

  __device__ FragmentRows(const LambdaAttentionParams& p, int64_t a, int pad, int window_rows,
                          int warp_t0, int lane) {
    const int n_q = static_cast<int>(p.n_queries), n_local = static_cast<int>(p.n_local);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      row_t[h] = warp_t0 + lane / 4 + 8 * h;
      const int real = row_t[h] - pad;
      const bool valid = row_t[h] < n_q && real >= 0;
      local[h] = valid ? local_keys(real + window_rows, n_local) : KeyRange<int>{INT_MAX, INT_MIN};
      global_last[h] =
          valid ? static_cast<int>(max64(-1, global_keys(a + real, p.n_global, p.n_local).last))
                : -1;
    }
  }

  // Whether row half h sees key row `key` of the tile (global: a global row).
  __device__ bool sees(int h, bool global, int key) const {
    const bool seen_globally = key <= global_last[h], seen_locally = local[h].contains(key);
    return global ? seen_globally : seen_locally;
  }
};

// The key rows every real row of the warp sees locally, for the test "no mask on this tile" (a
// mask-free tile leaves padding rows with scores they must not use: the epilogue writes zeros).
// Opaque: kept in registers, not re-derived per tile.
__device__ __forceinline__ KeyRange<int> warp_band(int warp_t0, int n_q, int pad,
                                                   int window_rows, int n_local) {
  const int first = max(warp_t0 - pad, 0), last = min(warp_t0 + 15, n_q - 1) - pad;
  const KeyRange<int> band =
      local_keys_of_all(first + window_rows, last + window_rows, n_local);
  return {opaque(band.first), opaque(band.last)};
}

// S = Q K^T for the warp's 16 rows and the tile's BN keys, sixteen keys (two n8 tiles) at a
// time. Global tiles take R_D q from shared memory (they are rare: ceil(n_global / 64) per
// block), the others Q's fragments held in registers.
template <typename T, int D>
__device__ __forceinline__ void score_tile(float (&score)[BN / 8][4],
                                           const uint32_t (&q_frag)[D / 16][4], bool global,
                                           const T* s_qcap, const T* k_st, int warp, int lane) {
#pragma unroll
  for (int np = 0; np < BN / 16; ++np) {
    float acc[2][4] = {};
    const int key_row = np * 16 + (lane % 8) + 8 * (lane / 16);
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      uint32_t kf[4];
      ldmatrix_x4(kf, k_st + swz<D>(key_row, ks * 16 + 8 * ((lane / 8) % 2)));
      if (global) {
        uint32_t qf[4];
        ldmatrix_x4(qf, s_qcap + q_fragment_at<D>(warp, lane, ks));
        mma_16816<T>(acc[0], qf, kf[0], kf[1]);
        mma_16816<T>(acc[1], qf, kf[2], kf[3]);
      } else {
        mma_16816<T>(acc[0], q_frag[ks], kf[0], kf[1]);
        mma_16816<T>(acc[1], q_frag[ks], kf[2], kf[3]);
      }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int e = 0; e < 4; ++e) score[2 * np + h][e] = acc[h][e];
  }
}

// O += P V: the probabilities of two n8 tiles are exactly an A fragment of m16n8k16.
template <typename T, int D>
__device__ __forceinline__ void accumulate_pv(float (&out_acc)[D / 8][4],
                                              const float (&prob)[BN / 8][4], const T* v_st,
                                              int lane) {
#pragma unroll
  for (int kk = 0; kk < BN / 16; ++kk) {
    uint32_t pf[4];
    probability_fragment<T>(prob, kk, pf);
#pragma unroll
    for (int dp = 0; dp < D / 16; ++dp) {
      uint32_t vf[4];
      ldmatrix_x4_trans(vf, v_st + swz<D>(kk * 16 + (lane % 8) + 8 * ((lane / 8) % 2),
                                          dp * 16 + 8 * (lane / 16)));
      mma_16816<T>(out_acc[2 * dp], pf, vf[0], vf[1]);
      mma_16816<T>(out_acc[2 * dp + 1], pf, vf[2], vf[3]);
    }
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 2)
    lambda_attention_mma_kernel(const LambdaAttentionParams p, const AttentionPlan plan,
                                const unsigned char* workspace, float* partial_out,
                                float* partial_lse) {
  using Layout = SmemLayout<T, D>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* const s_qcap = reinterpret_cast<T*>(smem + Layout::kQCap);
  T* const s_q = reinterpret_cast<T*>(smem + Layout::kQ);
  const KeyStages<T, D> stages{reinterpret_cast<T*>(smem + Layout::kK),
                               reinterpret_cast<T*>(smem + Layout::kV), smem + Layout::kValid};

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int n_splits = static_cast<int>(plan.n_splits);
  const int split = blockIdx.x % n_splits;
  // Heaviest row tiles (latest queries: the full band) first, for a balanced tail.
  const int row_tile = static_cast<int>(plan.row_tiles) - 1 - blockIdx.x / n_splits;
  const int64_t b = blockIdx.z, head = blockIdx.y;
  const int64_t kv_head = head / (p.n_heads_q / p.n_heads_kv);
  const int n_q = static_cast<int>(p.n_queries);
  const int t_lo = row_tile * BM, t_hi = min(t_lo + BM, n_q) - 1;  // rows of q and out
  // The sequence: row t >= pad is real row t - pad, at position a + t - pad (read once).
  const SequenceRows seq(p, b);
  const int64_t a = seq.start;
  const int pad = static_cast<int>(seq.padding);

  const KeySource<T, D> src(p, plan.prefill, workspace, b, kv_head, pad);
  const int window_rows = src.window_rows;
  // The block's real rows (none in a block of padding rows only: no tile).
  const PrefillTileList<BN> tiles(p, a, window_rows, max(t_lo - pad, 0), t_hi - pad);
  const int tile_begin = static_cast<int>(int64_t(tiles.count) * split / n_splits);
  const int tile_end = static_cast<int>(int64_t(tiles.count) * (split + 1) / n_splits);

  // Stage the Q tile and the first two key tiles (three cp.async groups, some possibly
  // empty), so that both key loads are in flight from the start; then rotate Q.
  stage_q_tile<T, D>(p, b, head, t_lo, s_q);
  stages.issue(src, tiles, tile_begin, tile_end, 0);
  stages.issue(src, tiles, tile_begin + 1, tile_end, 1);
  const QTileRotation<T, D> rotation(p, lane);
  cp_async_wait<2>();  // the Q group
  __syncthreads();
  rotation.rotate(s_q, s_qcap, t_lo - pad, warp, lane);
  __syncthreads();

  // This warp's 16 rows: Q (local rotation) as mma A fragments for the whole kernel.
  uint32_t q_frag[D / 16][4];
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks)
    ldmatrix_x4(q_frag[ks], s_q + q_fragment_at<D>(warp, lane, ks));

  const int warp_t0 = t_lo + warp * 16;
  const bool warp_active = opaque(warp_t0 < n_q && warp_t0 + 15 >= pad);  // holds a real row
  const FragmentRows rows(p, a, pad, window_rows, warp_t0, lane);
  const KeyRange<int> band =
      warp_band(warp_t0, n_q, pad, window_rows, static_cast<int>(p.n_local));

  float out_acc[D / 8][4] = {};
  float row_max[2] = {-INFINITY, -INFINITY};  // raw scores (unscaled)
  float row_sum[2] = {0.f, 0.f};              // this thread's share; reduced at the end
  const float scale_log2 = p.scale * 1.4426950408889634f;

  for (int it = tile_begin; it < tile_end; ++it) {
    const int stage = (it - tile_begin) & 1;
    const PrefillTile tile = tiles[it];
    // Double buffer: tile it + 1 goes into the stage tile it - 1 used, as soon as every warp is
    // done with it (tile it + 1 was issued by the prologue when it == tile_begin).
    if (it > tile_begin) {
      __syncthreads();
      stages.issue(src, tiles, it + 1, tile_end, stage ^ 1);
    }
    if (!src.needed(tile)) continue;  // never loaded; the same in every thread
    cp_async_wait<1>();  // tile it has landed (the latest group, tile it + 1, may be in flight)
    __syncthreads();
    if (!warp_active) continue;

    // The Λ mask, only on mixed tiles: which (row, key) pairs are visible (fragment.cuh).
    const uint8_t* const valid_st = stages.valid + stage * BN;
    const bool select = !(src.full(tile) && band.contains(tile.first, tile.first + BN - 1));
    uint32_t visible = ~0u;
    if (select) {
      visible = visible_elements<BN / 8>(
          lane, [&](int col) { return valid_st[col] != 0; },
          [&](int h, int col) { return rows.sees(h, tile.global, tile.first + col); });
      if (!__any_sync(0xffffffffu, visible != 0)) continue;
    }

    float score[BN / 8][4];
    score_tile<T, D>(score, q_frag, tile.global, s_qcap, stages.k + stage * Layout::kKTile, warp,
                     lane);
    if (select) mask_invisible(score, visible);
    online_softmax_step(score, row_max, row_sum, out_acc, scale_log2);
    accumulate_pv<T, D>(out_acc, score, stages.v + stage * Layout::kKTile, lane);
  }

  if (warp_t0 >= n_q) return;
  const OutputRows<T> dst(p, partial_out, partial_lse, n_splits, split);
  store_fragment_rows<T, D / 8>(dst, b, head, rows.row_t, pad, out_acc, row_max, row_sum,
                                scale_log2, lane);
}

template <typename T, int D>
Status launch(const LambdaAttentionParams& params, const AttentionPlan& plan, void* workspace,
              cudaStream_t stream) {
  const SplitPartials partials = split_partials(plan, workspace);
  return launch_kernel(lambda_attention_mma_kernel<T, D>, "lambda_attention_mma_kernel",
                       prefill_grid(params, plan), kThreads, SmemLayout<T, D>::kBytes, stream,
                       params, plan, static_cast<const unsigned char*>(workspace), partials.out,
                       partials.lse);
}

template <typename T, int D> struct Launcher {
  static constexpr auto run = launch<T, D>;
};

}  // namespace

Status launch_lambda_attention_mma(const LambdaAttentionParams& params, const AttentionPlan& plan,
                                   void* workspace, cudaStream_t stream) {
  return launch_kernel_types<Launcher>(params, params, plan, workspace, stream);
}

}  // namespace lminf::cuda
