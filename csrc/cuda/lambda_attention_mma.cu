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
#include "lambda_attention_plan.cuh"
#include "prefill_tile_list.cuh"

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

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 2)
    lambda_attention_mma_kernel(const LambdaAttentionParams p, const AttentionPlan plan,
                                const unsigned char* workspace, float* partial_out,
                                float* partial_lse) {
  constexpr int kChunks = D / 8;       // 16-byte chunks per row
  constexpr int kKSteps = D / 16;      // k16 steps of Q K^T
  constexpr int kKeySteps = BN / 16;   // k16 steps of P V
  constexpr int kNTiles = BN / 8;      // n8 tiles of S
  constexpr int kDTiles = D / 8;       // n8 tiles of O
  // Q rotation: a lane owns the frequency pair (f, f + 1), f = 2 * (lane % kLanesPerRow), and
  // moves it as one 32-bit word; a warp covers kRowsPerPass rows at once (2 for head_dim 64).
  constexpr int kLanesPerRow = D / 4 < 32 ? D / 4 : 32;
  constexpr int kRowStep = kWarps * (32 / kLanesPerRow);
  using Layout = SmemLayout<T, D>;

  extern __shared__ __align__(128) unsigned char smem[];
  T* const s_qcap = reinterpret_cast<T*>(smem + Layout::kQCap);
  T* const s_q = reinterpret_cast<T*>(smem + Layout::kQ);
  T* const s_k = reinterpret_cast<T*>(smem + Layout::kK);
  T* const s_v = reinterpret_cast<T*>(smem + Layout::kV);
  uint8_t* const s_valid = smem + Layout::kValid;

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
  // empty), so that both key loads are in flight from the start.
  {
    const RowsView<const T> q = p.q.as<const T>().rows(b, head);
    for (int c = threadIdx.x; c < BM * kChunks; c += kThreads) {
      const int r = c / kChunks, col = (c % kChunks) * 8;
      const bool valid = t_lo + r < n_q;
      cp_async_16(s_q + swz<D>(r, col), valid ? q.row(t_lo + r) + col : q.data, valid);
    }
    cp_async_commit();
    for (int st = 0; st < 2; ++st) {
      if (tile_begin + st < tile_end && src.needed(tiles[tile_begin + st]))
        src.load(tiles[tile_begin + st], s_k + st * Layout::kKTile, s_v + st * Layout::kKTile,
                 s_valid + st * BN);
      cp_async_commit();
    }
  }

  // Rotate the staged Q rows: s_q <- R_t q (local; t = i - a), s_qcap <- R_D q (global).
  // plan_attention sends rotary_dim % 4 != 0 to the generic kernel, so a lane rotates both
  // frequencies of its pair or neither.
  {
    const int half = static_cast<int>(p.rotary_dim / 2);
    const int f = 2 * (lane % kLanesPerRow);
    const bool rotates = f < half;
    float inv_freq[2] = {0.f, 0.f}, cap_cos[2], cap_sin[2];
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      if (rotates) inv_freq[e] = p.inv_freq[f + e];
      rope_sincos(p.distance_cap, inv_freq[e], &cap_cos[e], &cap_sin[e]);
    }
    cp_async_wait<2>();  // the Q group
    __syncthreads();
    for (int r = warp + kWarps * (lane / kLanesPerRow); r < BM; r += kRowStep) {
      if (rotates) {
        float c[2], s[2];
        rope_sincos(t_lo + r - pad, inv_freq[0], &c[0], &s[0]);  // padding rows: unused
        rope_sincos(t_lo + r - pad, inv_freq[1], &c[1], &s[1]);
        uint32_t* const lo = reinterpret_cast<uint32_t*>(s_q + swz<D>(r, f));
        uint32_t* const hi = reinterpret_cast<uint32_t*>(s_q + swz<D>(r, f + half));
        const float2 x1 = unpack2<T>(*lo), x2 = unpack2<T>(*hi);
        *lo = pack2<T>(x1.x * c[0] - x2.x * s[0], x1.y * c[1] - x2.y * s[1]);
        *hi = pack2<T>(x2.x * c[0] + x1.x * s[0], x2.y * c[1] + x1.y * s[1]);
        *reinterpret_cast<uint32_t*>(s_qcap + swz<D>(r, f)) = pack2<T>(
            x1.x * cap_cos[0] - x2.x * cap_sin[0], x1.y * cap_cos[1] - x2.y * cap_sin[1]);
        *reinterpret_cast<uint32_t*>(s_qcap + swz<D>(r, f + half)) = pack2<T>(
            x2.x * cap_cos[0] + x1.x * cap_sin[0], x2.y * cap_cos[1] + x1.y * cap_sin[1]);
      }
      for (int col = 2 * half + f; col < D; col += 2 * kLanesPerRow)  // past rotary_dim
        *reinterpret_cast<uint32_t*>(s_qcap + swz<D>(r, col)) =
            *reinterpret_cast<const uint32_t*>(s_q + swz<D>(r, col));
    }
    __syncthreads();
  }

  // This warp's 16 rows: Q (local rotation) as mma A fragments for the whole kernel.
  uint32_t q_frag[kKSteps][4];
#pragma unroll
  for (int ks = 0; ks < kKSteps; ++ks)
    ldmatrix_x4(q_frag[ks], s_q + swz<D>(warp * 16 + (lane % 8) + 8 * ((lane / 8) % 2),
                                         ks * 16 + 8 * (lane / 16)));

  // The two rows this thread holds in every accumulator fragment: warp row lane/4 and +8.
  // Real row t' = t - pad sees key row u locally for u in [u_lo, u_hi] (i - j in [0, L)), and
  // global row j for j <= g_hi (i - j >= L); padding rows and rows past the chunk see nothing.
  const int warp_t0 = t_lo + warp * 16;
  const bool warp_active = opaque(warp_t0 < n_q && warp_t0 + 15 >= pad);  // holds a real row
  int row_t[2], u_lo[2], u_hi[2], g_hi[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    row_t[h] = warp_t0 + lane / 4 + 8 * h;
    const int real = row_t[h] - pad;
    const bool valid = row_t[h] < n_q && real >= 0;
    u_lo[h] = valid ? real + window_rows - static_cast<int>(p.n_local) + 1 : INT_MAX;
    u_hi[h] = valid ? real + window_rows : INT_MIN;
    g_hi[h] = valid ? static_cast<int>(max64(-1, min64(a + real - p.n_local,
                                                       plan.prefill.global_rows)))
                    : -1;
  }
  // Band covered by every real row of the warp, for the test "no select on this tile" (the
  // shortcut leaves padding rows with scores they must not use: the epilogue writes zeros).
  const int warp_r0 = max(warp_t0 - pad, 0), warp_r1 = min(warp_t0 + 15, n_q - 1) - pad;
  const int band_lo = opaque(warp_r1 + window_rows - static_cast<int>(p.n_local) + 1);
  const int band_hi = opaque(warp_r0 + window_rows);

  float out_acc[kDTiles][4] = {};
  float row_max[2] = {-INFINITY, -INFINITY};  // raw scores (unscaled)
  float row_sum[2] = {0.f, 0.f};              // this thread's share; reduced at the end
  const float scale_log2 = p.scale * 1.4426950408889634f;

  for (int it = tile_begin; it < tile_end; ++it) {
    const int stage = (it - tile_begin) & 1;
    const T* const k_st = s_k + stage * Layout::kKTile;
    const T* const v_st = s_v + stage * Layout::kKTile;
    const uint8_t* const valid_st = s_valid + stage * BN;
    const PrefillTile tile = tiles[it];

    // Double buffer: tile it + 1 goes into the stage tile it - 1 used, as soon as every warp is
    // done with it (tile it + 1 was issued by the prologue when it == tile_begin).
    if (it > tile_begin) {
      __syncthreads();
      if (it + 1 < tile_end && src.needed(tiles[it + 1]))
        src.load(tiles[it + 1], s_k + (stage ^ 1) * Layout::kKTile,
                 s_v + (stage ^ 1) * Layout::kKTile, s_valid + (stage ^ 1) * BN);
      cp_async_commit();
    }
    if (!src.needed(tile)) continue;  // never loaded; the same in every thread
    cp_async_wait<1>();  // tile it has landed (the latest group, tile it + 1, may be in flight)
    __syncthreads();
    if (!warp_active) continue;

    // Which (row, key) pairs are visible: bit 4 n + 2 h + e is accumulator element (row
    // lane/4 + 8h, key 8n + 2(lane%4) + e), the fragment order of mma's C.
    const bool select = !(src.full(tile) && tile.first >= band_lo && tile.first + BN - 1 <= band_hi);
    uint32_t visible = ~0u;
    if (select) {
      visible = 0;
#pragma unroll
      for (int n = 0; n < kNTiles; ++n)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = 8 * n + 2 * (lane % 4) + e, key = tile.first + col;
          if (!valid_st[col]) continue;
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const bool seen = tile.global ? key <= g_hi[h] : key >= u_lo[h] && key <= u_hi[h];
            if (seen) visible |= 1u << (4 * n + 2 * h + e);
          }
        }
      if (!__any_sync(0xffffffffu, visible != 0)) continue;
    }

    // S = Q K^T, sixteen keys (two n8 tiles) at a time; the global tiles take R_D q from
    // shared memory (they are rare: ceil(n_global / 64) per block).
    float score[kNTiles][4];
#pragma unroll
    for (int np = 0; np < kNTiles / 2; ++np) {
      float acc[2][4] = {};
      const int key_row = np * 16 + (lane % 8) + 8 * (lane / 16);
#pragma unroll
      for (int ks = 0; ks < kKSteps; ++ks) {
        uint32_t kf[4];
        ldmatrix_x4(kf, k_st + swz<D>(key_row, ks * 16 + 8 * ((lane / 8) % 2)));
        if (tile.global) {
          uint32_t qf[4];
          ldmatrix_x4(qf, s_qcap + swz<D>(warp * 16 + (lane % 8) + 8 * ((lane / 8) % 2),
                                          ks * 16 + 8 * (lane / 16)));
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
    if (select) {
#pragma unroll
      for (int n = 0; n < kNTiles; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (!((visible >> (4 * n + e)) & 1u)) score[n][e] = -INFINITY;
    }

    online_softmax_step(score, row_max, row_sum, out_acc, scale_log2);

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

  if (warp_t0 >= n_q) return;
  // Epilogue: finish the row sums across the quad that shares each row, normalise, store.
  // Padding rows are zeros (and, split, partials that weigh nothing).
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float sum = row_sum[h];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    if (row_t[h] >= n_q) continue;
    if (row_t[h] < pad) {  // whatever a no-select tile left in the row (even NaN) goes
      sum = 0.f;
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt) out_acc[dt][2 * h] = out_acc[dt][2 * h + 1] = 0.f;
    }
    const float inv_sum = sum > 0.f ? 1.f / sum : 0.f;
    if (n_splits == 1) {
      T* out = p.out.as<T>().at(b, head, row_t[h]);
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt) {
        const int col = 8 * dt + 2 * (lane % 4);
        *reinterpret_cast<uint32_t*>(out + col) =
            pack2<T>(out_acc[dt][2 * h] * inv_sum, out_acc[dt][2 * h + 1] * inv_sum);
      }
    } else {
      const int64_t out_row = (b * p.n_heads_q + head) * n_q + row_t[h];
      float* out = partial_out + (out_row * n_splits + split) * D;
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt) {
        const int col = 8 * dt + 2 * (lane % 4);
        *reinterpret_cast<float2*>(out + col) =
            make_float2(out_acc[dt][2 * h] * inv_sum, out_acc[dt][2 * h + 1] * inv_sum);
      }
      if (lane % 4 == 0)
        partial_lse[out_row * n_splits + split] =
            sum > 0.f ? row_max[h] * scale_log2 + log2f(sum) : -INFINITY;
    }
  }
}

template <typename T, int D>
Status launch(const LambdaAttentionParams& params, const AttentionPlan& plan, void* workspace,
              cudaStream_t stream) {
  constexpr size_t kSmem = SmemLayout<T, D>::kBytes;
  auto* kernel = lambda_attention_mma_kernel<T, D>;
  const Status status = allow_dynamic_smem(kernel, kSmem, "lambda_attention");
  if (!status.ok()) return status;
  const SplitPartials partials = split_partials(plan, workspace);
  const dim3 grid(static_cast<unsigned>(plan.row_tiles * plan.n_splits),
                  static_cast<unsigned>(params.n_heads_q), static_cast<unsigned>(params.batch));
  kernel<<<grid, kThreads, kSmem, stream>>>(params, plan,
                                            static_cast<const unsigned char*>(workspace),
                                            partials.out, partials.lse);
  return launch_status("lambda_attention_mma_kernel");
}

}  // namespace

Status launch_lambda_attention_mma(const LambdaAttentionParams& params, const AttentionPlan& plan,
                                   void* workspace, cudaStream_t stream) {
  return dispatch_kernel_types(params, [&](auto t, auto d) {
    return launch<typename decltype(t)::type, decltype(d)::value>(params, plan, workspace, stream);
  });
}

}  // namespace lminf::cuda
