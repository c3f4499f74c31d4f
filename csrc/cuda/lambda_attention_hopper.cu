// Λ-attention prefill on Hopper (sm_90a): wgmma and TMA over the pre-pass rows of
// rotate_chunk_keys.cu. The same arithmetic as lambda_attention_mma.cu (read its header for
// the chunk anchor: keys rotated by j - a, Q rotated once by i - a, R_D q for the global keys),
// in 128 x 128 tiles on the Hopper tensor cores.
//
// A block owns 128 consecutive queries of one head, as three warpgroups:
//   WG0, the producer (24 registers): one thread issues every TMA load, Q once (both
//     consumers' rows, barrier q_full), then per key tile K and V into a ring of kStages
//     stages (full[s]: one arrival with the tile's bytes; empty[s]: one arrival per consumer
//     warpgroup once its last wgmma on the stage has retired);
//   WG1, WG2, the consumers (240 registers), 64 query rows each: rotate their Q rows in
//     shared memory (R_{t-p} q in place, R_D q beside it), then per tile S = Q K^T (wgmma
//     m64n128k16, both operands in shared memory; R_D q as A on global tiles), the select
//     only on mixed tiles, the online softmax in float32 (common.cuh), P rounded to T as the
//     register A operand of O += P V (wgmma m64nDk16, V transposed from shared memory).
// The two consumers take turns issuing their Q K^T through two named barriers (FA3's
// ping-pong), so that one group's softmax runs while the other's matmuls occupy the tensor
// cores.
//
// Tiles, in the same order in all three roles (HopperTileList): the global tiles, then the
// band's window tiles (those the pre-pass found empty are skipped by every role), then its
// chunk tiles. A 128-key tile never straddles the window and the chunk: the window is a
// multiple of kPrefillRowAlign = 128 rows. Splits (few blocks) cut that list as the mma.sync
// kernel does and write the same partials for lse_merge.cu.
//
// Positions, sequence by sequence: a = *query_start.of(b), p =
// padding[b] (0 without padding); chunk row t >= p is the query and key at position
// a + t - p, rows t < p are padding (never a key; output zeros). Key row u of the pre-pass
// sequence sits at position a - W + u in the window (u < W) and a + (u - W) - p in the chunk,
// so in "effective" rows (u in the window, u - p in the chunk) query t sees locally the rows
// [W + t - p - L + 1, W + t - p].
// This file is the Hopper kernel: hopper_prefill.cuh declares (not stubs) what it defines.
#ifndef LMINF_WITH_HOPPER_KERNEL
#define LMINF_WITH_HOPPER_KERNEL 1
#endif

#include <cuda.h>
#include <cuda_runtime.h>

#include <climits>
#include <cmath>

#include "common.cuh"
#include "epilogue.cuh"
#include "fragment.cuh"
#include "hopper.cuh"
#include "hopper_prefill.cuh"
#include "lambda_attention_plan.cuh"
#include "lminf/lambda_mask.h"
#include "softmax.cuh"

namespace lminf::cuda {
namespace {

constexpr int BM = kHopperBlockRows;  // query rows per block
constexpr int BN = kHopperBlockKeys;  // keys per tile
constexpr int kGroupRows = 64;        // query rows per consumer warpgroup
constexpr int kThreads = 384;         // producer + two consumers
constexpr int kProducerRegisters = 24, kConsumerRegisters = 240;  // 128 x (24 + 2 x 240) <= 64K
// Named barriers (0 is __syncthreads): a consumer's turn to issue its Q K^T (1, 2), and one
// per consumer warpgroup for its Q rotation (3, 4).
constexpr int kTurnBarrier = 1, kGroupBarrier = 3;
constexpr int kMaxSplits = 128;

// The tensor maps of one call (__grid_constant__: they stay in parameter space, where TMA
// reads them). Boxes are one 64-column panel of 64 (Q) or 128 (keys, values) rows.
struct HopperMaps {
  CUtensorMap q;              // 4D {D, n_queries, n_heads_q, batch}
  CUtensorMap keys;           // 3D {D, W + n_queries, batch * n_heads_kv}: rotated key sequence
  CUtensorMap window_values;  // 3D {D, W, batch * n_heads_kv} (not encoded when W == 0)
  CUtensorMap chunk_values;   // 4D {D, n_queries, n_heads_kv, batch}: v in place
  CUtensorMap global_keys;    // 3D {D, global_rows, batch * n_heads_kv} (not encoded when 0)
  CUtensorMap global_values;
};

// Shared memory, from a 1024-byte aligned base (the 128-byte swizzle atom): every tile is
// D / 64 panels of [rows][64] elements, as TMA writes them.
template <int D> struct HopperSmem {
  static constexpr int kStages = D == 64 ? 3 : 2;  // hd128: 192 KB with two
  static constexpr int kQBytes = kGroupRows * D * 2;  // one consumer's Q rows
  static constexpr int kTileBytes = BN * D * 2;       // one K or V tile
  static constexpr int kQ = 0;                            // [2][64][D] Q, rotated by t - p
  static constexpr int kQCap = kQ + 2 * kQBytes;          // [2][64][D] R_D q
  static constexpr int kK = kQCap + 2 * kQBytes;          // [kStages][128][D]
  static constexpr int kV = kK + kStages * kTileBytes;    // [kStages][128][D]
  static constexpr int kBarriers = kV + kStages * kTileBytes;  // q_full, full[], empty[]
  static constexpr int kBytes = kBarriers + 8 * (1 + 2 * kStages);
  static constexpr int kAlloc = kBytes + sm90::kPanelAlign;  // slack to align the base
  static_assert(kQBytes % sm90::kPanelAlign == 0 && kTileBytes % sm90::kPanelAlign == 0,
                "panels stay 1024-byte aligned");
};

// Byte offset of element (r, col) in a panelled, 128-byte swizzled tile of `rows` rows.
__device__ __forceinline__ int swizzled(int rows, int r, int col) {
  return (col / 64) * rows * 128 + r * 128 + ((((col % 64) / 8) ^ (r % 8)) * 16) + (col % 8) * 2;
}

enum TileKind : int { kGlobalTile = 0, kWindowTile = 1, kChunkTile = 2 };
struct KeyTile {
  int kind;
  int first;  // first row: of the global tile, or of the key sequence (window, then chunk)
};

// The tiles a block visits for its real query rows [r_lo, r_hi] (none if r_lo > r_hi): the
// global tiles holding positions j < n_global some row sees beyond its window (j <= a + r_hi -
// p - L), the window tiles and the chunk tiles of the band. Index arithmetic is int32 (the
// planner bounds every row count by 2^31 / head_dim).
struct HopperTileList {
  int global_tiles, window_begin, window_tiles, chunk_begin, count;

  __device__ HopperTileList(int64_t a, int pad, int window_rows, int n_local, int64_t n_global,
                            int r_lo, int r_hi) {
    global_tiles = window_tiles = count = window_begin = chunk_begin = 0;
    if (r_lo > r_hi) return;
    const int64_t n_global_keys = global_keys(a + r_hi - pad, n_global, int64_t(n_local)).size();
    global_tiles = static_cast<int>((n_global_keys + BN - 1) / BN);
    const KeyRange<int> band =  // effective rows
        local_keys_of_any(window_rows + r_lo - pad, window_rows + r_hi - pad, n_local);
    const int band_lo = band.first, band_hi = band.last;
    const int window_lo = max(0, band_lo), window_hi = min(window_rows - 1, band_hi);
    if (window_lo <= window_hi) {
      window_begin = window_lo / BN;
      window_tiles = window_hi / BN + 1 - window_begin;
    }
    const int chunk_lo = max(window_rows, band_lo) + pad, chunk_hi = band_hi + pad;  // rows u
    int chunk_tiles = 0;
    if (chunk_lo <= chunk_hi) {
      chunk_begin = chunk_lo / BN;
      chunk_tiles = chunk_hi / BN + 1 - chunk_begin;
    }
    count = global_tiles + window_tiles + chunk_tiles;
  }

  __device__ KeyTile operator[](int index) const {
    if (index < global_tiles) return {kGlobalTile, index * BN};
    index -= global_tiles;
    if (index < window_tiles) return {kWindowTile, (window_begin + index) * BN};
    return {kChunkTile, (chunk_begin + index - window_tiles) * BN};
  }
};

// The pre-pass's index arrays, and what they say about a tile.
struct PrepassIndex {
  const int32_t* window_slot;        // [W] cache slot or -1
  const int32_t* global_source;      // [global_rows] source or -1
  const uint8_t* window_tile_state;  // [W / 64], per 64-key tile of the mma.sync kernel

  __device__ PrepassIndex(const PrefillWorkspace& ws, const unsigned char* workspace)
      : window_slot(reinterpret_cast<const int32_t*>(workspace + ws.window_slot)),
        global_source(reinterpret_cast<const int32_t*>(workspace + ws.global_source)),
        window_tile_state(workspace + ws.window_tile_state) {}

  // A window tile no cache slot fills is loaded by nobody.
  __device__ bool needed(KeyTile tile) const {
    static_assert(BN == 2 * kMmaBlockKeys, "a tile is two of the pre-pass's 64-row states");
    if (tile.kind != kWindowTile) return true;
    const int s = tile.first / kMmaBlockKeys;
    return window_tile_state[s] != kTileEmpty || window_tile_state[s + 1] != kTileEmpty;
  }
  __device__ bool window_full(KeyTile tile) const {
    const int s = tile.first / kMmaBlockKeys;
    return window_tile_state[s] == kTileFull && window_tile_state[s + 1] == kTileFull;
  }
};

// What a block owns: 128 query rows [t_lo, t_lo + 128) of one head of sequence b, and split
// `split` of its tile list (int32 throughout: the planner bounds every row count).
struct HopperBlock {
  int n_splits, split, b, head, kv_head, kv_row, n_q, window_rows, n_local, pad, t_lo;
  int64_t a;  // the sequence's start: the position of its first real row
  HopperTileList tiles;
  int tile_begin, tile_end;

  __device__ HopperBlock(const LambdaAttentionParams& p, const AttentionPlan& plan)
      : n_splits(static_cast<int>(plan.n_splits)),
        split(blockIdx.x % n_splits),
        b(blockIdx.z),
        head(blockIdx.y),
        kv_head(head / (static_cast<int>(p.n_heads_q) / static_cast<int>(p.n_heads_kv))),
        kv_row(b * static_cast<int>(p.n_heads_kv) + kv_head),  // of the 3D pre-pass maps
        n_q(static_cast<int>(p.n_queries)),
        window_rows(static_cast<int>(plan.prefill.window_rows)),
        n_local(static_cast<int>(p.n_local)),
        pad(p.padding != nullptr ? static_cast<int>(p.padding[b]) : 0),
        // Heaviest row tiles (latest queries: the full band) first, for a balanced tail.
        t_lo((static_cast<int>(plan.row_tiles) - 1 - static_cast<int>(blockIdx.x) / n_splits) * BM),
        a(*p.query_start.of(b)),
        tiles(a, pad, window_rows, n_local, p.n_global, max(t_lo, pad), min(t_lo + BM, n_q) - 1),
        // int32: count < 2^31 / 64 / 128 (the planner's row bound), times at most 128 splits.
        tile_begin(tiles.count * split / n_splits),
        tile_end(tiles.count * (split + 1) / n_splits) {}
};

// The mbarriers in shared memory: Q landed; per stage, full (the producer's TMA bytes) and
// empty (both consumer groups done with it).
struct HopperBarriers {
  uint64_t* q_full;
  uint64_t* full;   // [kStages]
  uint64_t* empty;  // [kStages]
};

// The device code of the roles: sm_90a only (hopper.cuh's building blocks exist nowhere else).
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

// The producer (one thread): Q once, both consumers' rows, then K and V of every tile the
// block loads into the ring of stages, each once both consumers released the stage's last use.
template <int D>
__device__ __forceinline__ void produce_tiles(const HopperMaps& maps, unsigned char* smem,
                                              const HopperBarriers& bar, const HopperBlock& blk,
                                              const PrepassIndex& index) {
  using namespace sm90;
  using Smem = HopperSmem<D>;
  constexpr int kPanels = D / kPanelElems;
  prefetch_tensor_map(&maps.q);
  prefetch_tensor_map(&maps.keys);
  prefetch_tensor_map(&maps.chunk_values);
  mbarrier_arrive_expect_tx(bar.q_full, 2 * Smem::kQBytes);
  for (int c = 0; c < 2; ++c)
    for (int panel = 0; panel < kPanels; ++panel)
      tma_load_4d(smem + Smem::kQ + c * Smem::kQBytes + panel * kGroupRows * 128, &maps.q,
                  panel * kPanelElems, blk.t_lo + c * kGroupRows, blk.head, blk.b, bar.q_full);
  int n = 0;  // tiles loaded
  for (int it = blk.tile_begin; it < blk.tile_end; ++it) {
    const KeyTile tile = blk.tiles[it];
    if (!index.needed(tile)) continue;
    const int stage = n % Smem::kStages;
    if (n >= Smem::kStages) mbarrier_wait(&bar.empty[stage], (n / Smem::kStages - 1) & 1);
    mbarrier_arrive_expect_tx(&bar.full[stage], 2 * Smem::kTileBytes);
    unsigned char* const k_st = smem + Smem::kK + stage * Smem::kTileBytes;
    unsigned char* const v_st = smem + Smem::kV + stage * Smem::kTileBytes;
    for (int panel = 0; panel < kPanels; ++panel) {
      const int x = panel * kPanelElems, at = panel * BN * 128;
      if (tile.kind == kGlobalTile) {
        tma_load_3d(k_st + at, &maps.global_keys, x, tile.first, blk.kv_row, &bar.full[stage]);
        tma_load_3d(v_st + at, &maps.global_values, x, tile.first, blk.kv_row, &bar.full[stage]);
      } else {
        tma_load_3d(k_st + at, &maps.keys, x, tile.first, blk.kv_row, &bar.full[stage]);
        if (tile.kind == kWindowTile)
          tma_load_3d(v_st + at, &maps.window_values, x, tile.first, blk.kv_row, &bar.full[stage]);
        else  // rows past the chunk read zeros
          tma_load_4d(v_st + at, &maps.chunk_values, x, tile.first - blk.window_rows, blk.kv_head,
                      blk.b, &bar.full[stage]);
      }
    }
    ++n;
  }
}

// Waits for this consumer group's Q rows, then rotates them in place, s_q <- R_t q (local; t
// the real row, first_t + r for row r), and writes s_qcap <- R_D q (global). Thread tid owns the
// 32-bit word of features (f, f + 1), f = 2 (tid % (D / 2)), in rows tid / (D / 2) + k
// kRowStep; plan_attention sends rotary_dim % 4 != 0 elsewhere, so a word is rotated whole or
// not at all.
template <typename T, int D>
__device__ __forceinline__ void rotate_group_q(const LambdaAttentionParams& p,
                                               unsigned char* s_q, unsigned char* s_qcap,
                                               int first_t, int tid, uint64_t* q_full) {
  constexpr int kWordsPerRow = D / 2, kRowStep = 128 / kWordsPerRow;
  const int half = static_cast<int>(p.rotary_dim / 2);
  const int f = 2 * (tid % kWordsPerRow);
  float inv_freq[2] = {0.f, 0.f}, cap_cos[2] = {1.f, 1.f}, cap_sin[2] = {0.f, 0.f};
  if (f < half) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      inv_freq[e] = p.inv_freq[f + e];
      rope_sincos(p.distance_cap, inv_freq[e], &cap_cos[e], &cap_sin[e]);
    }
  }
  sm90::mbarrier_wait(q_full, 0);
  const auto word = [](unsigned char* tile, int r, int col) {
    return reinterpret_cast<uint32_t*>(tile + swizzled(kGroupRows, r, col));
  };
  for (int r = tid / kWordsPerRow; r < kGroupRows; r += kRowStep) {
    if (f < half) {
      float c[2], s[2];
      rope_sincos(first_t + r, inv_freq[0], &c[0], &s[0]);
      rope_sincos(first_t + r, inv_freq[1], &c[1], &s[1]);
      rotate_query_pair<T>(word(s_q, r, f), word(s_q, r, f + half), word(s_qcap, r, f),
                           word(s_qcap, r, f + half), c, s, cap_cos, cap_sin);
    } else if (f >= 2 * half) {  // past rotary_dim: R_D q = q
      *word(s_qcap, r, f) = *word(s_q, r, f);
    }
  }
  sm90::fence_proxy_async();  // these generic-proxy writes, before wgmma reads them
}

// The keys the two rows of a consumer thread's accumulators (warp rows lane / 4 and + 8) see,
// as rows of the pre-pass: window rows local[h], chunk rows chunk[h] (the same effective rows,
// u - pad in the chunk), global rows [0, global_last[h]]. Padding rows and rows past the chunk
// see nothing.
struct GroupRows {
  int row_t[2];  // chunk rows (padding counted)
  KeyRange<int> local[2], chunk[2];
  int global_last[2];

  __device__ GroupRows(const LambdaAttentionParams& p, const HopperBlock& blk, int warp_t0,
                       int lane) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      row_t[h] = warp_t0 + lane / 4 + 8 * h;
      const bool real = row_t[h] >= blk.pad && row_t[h] < blk.n_q;
      const KeyRange<int> seen = local_keys(blk.window_rows + row_t[h] - blk.pad, blk.n_local);
      local[h] = real ? seen : KeyRange<int>{INT_MAX, INT_MIN};
      chunk[h] = real ? KeyRange<int>{seen.first + blk.pad, seen.last + blk.pad}
                      : KeyRange<int>{INT_MAX, INT_MIN};
      global_last[h] = real ? static_cast<int>(max64(
                                  -1, global_keys(blk.a + row_t[h] - blk.pad, p.n_global,
                                                  p.n_local).last))
                            : -1;
    }
  }
};

// Whether every row of the consumer group (rows [group_t0, group_t0 + 64), all real) sees every
// key of the tile locally: then it needs no per-element mask.
__device__ __forceinline__ bool group_sees_all(const HopperBlock& blk, const PrepassIndex& index,
                                               KeyTile tile, int group_t0) {
  if (tile.kind == kGlobalTile || group_t0 < blk.pad || group_t0 + kGroupRows > blk.n_q)
    return false;
  const KeyRange<int> band =  // effective rows
      local_keys_of_all(blk.window_rows + group_t0 - blk.pad,
                        blk.window_rows + group_t0 + kGroupRows - 1 - blk.pad, blk.n_local);
  if (tile.kind == kWindowTile)
    return band.contains(tile.first, tile.first + BN - 1) && index.window_full(tile);
  return tile.first >= blk.window_rows + blk.pad && tile.first + BN <= blk.window_rows + blk.n_q &&
         band.contains(tile.first - blk.pad, tile.first + BN - 1 - blk.pad);
}

// -inf at the scores of pairs the rows do not see (fragment.cuh: wgmma's accumulators have
// mma's per-warp layout): keys the pre-pass has not (an empty slot, a missing global position,
// past the chunk), and keys outside the row's range for the tile's kind.
__device__ __forceinline__ void mask_tile(float (&s)[BN / 8][4], const HopperBlock& blk,
                                          const PrepassIndex& index, const GroupRows& rows,
                                          KeyTile tile, int lane) {
  KeyRange<int> seen[2];
#pragma unroll
  for (int h = 0; h < 2; ++h)
    seen[h] = tile.kind == kGlobalTile   ? KeyRange<int>{0, rows.global_last[h]}
              : tile.kind == kWindowTile ? rows.local[h]
                                         : rows.chunk[h];
  mask_unseen(
      s, lane,
      [&](int col) {
        const int u = tile.first + col;  // key row of the column
        return tile.kind == kGlobalTile   ? index.global_source[u] >= 0
               : tile.kind == kWindowTile ? index.window_slot[u] >= 0
                                          : u >= blk.window_rows + blk.pad &&
                                                u < blk.window_rows + blk.n_q;
      },
      [&](int h, int col) { return seen[h].contains(tile.first + col); });
}

// S = Q K^T for the group's 64 rows (A: Q, or R_D q on global tiles; both operands in shared
// memory), issued in this group's turn, which it then hands to the other group (unless there
// is nothing left for that group to take: hand_on false); returns once S is in registers.
template <typename T, int D>
__device__ __forceinline__ void score_tile_in_turn(float (&s)[BN / 8][4],
                                                   const unsigned char* a_tile,
                                                   const unsigned char* k_st, int consumer,
                                                   bool hand_on) {
  using namespace sm90;
  named_barrier_sync(kTurnBarrier + consumer, 256);
  fence_operands(s);
  wgmma_fence();
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks)
    Wgmma<T, BN>::ss(s, desc_k_major(a_tile, kGroupRows, ks), desc_k_major(k_st, BN, ks), ks > 0);
  wgmma_commit();
  if (hand_on) named_barrier_arrive(kTurnBarrier + (1 - consumer), 256);
  wgmma_wait<0>();
  fence_operands(s);
}

// O += P V: P rounded to T as the register A operand, V MN-major from shared memory.
template <typename T, int D>
__device__ __forceinline__ void accumulate_pv(float (&o)[D / 8][4], const float (&s)[BN / 8][4],
                                              const unsigned char* v_st) {
  using namespace sm90;
  uint32_t pf[BN / 16][4];
#pragma unroll
  for (int kk = 0; kk < BN / 16; ++kk) probability_fragment<T>(s, kk, pf[kk]);
  fence_operands(o);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < BN / 16; ++kk) Wgmma<T, D>::rs(o, pf[kk], desc_mn_major(v_st, BN, kk), 1);
  wgmma_commit();
  wgmma_wait<0>();
  fence_operands(o);
}

#endif  // __CUDA_ARCH_FEAT_SM90_ALL

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1)
    lambda_attention_hopper_kernel(const __grid_constant__ HopperMaps maps,
                                   const LambdaAttentionParams p, const AttentionPlan plan,
                                   const unsigned char* workspace, float* partial_out,
                                   float* partial_lse) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using namespace sm90;
  using Smem = HopperSmem<D>;
  extern __shared__ unsigned char smem_raw[];
  unsigned char* const smem =
      smem_raw + (kPanelAlign - smem_addr(smem_raw) % kPanelAlign) % kPanelAlign;
  uint64_t* const q_full = reinterpret_cast<uint64_t*>(smem + Smem::kBarriers);
  const HopperBarriers bar{q_full, q_full + 1, q_full + 1 + Smem::kStages};
  const HopperBlock blk(p, plan);
  const PrepassIndex index(plan.prefill, workspace);

  if (threadIdx.x == 0) {
    mbarrier_init(bar.q_full, 1);
    for (int s = 0; s < Smem::kStages; ++s) {
      mbarrier_init(&bar.full[s], 1);   // the producer's arrive.expect_tx
      mbarrier_init(&bar.empty[s], 2);  // one per consumer warpgroup
    }
    fence_barrier_init();
  }
  __syncthreads();

  const int group = threadIdx.x / 128;  // 0 producer, 1 and 2 consumers
  if (group == 0) {
    setmaxnreg_dec<kProducerRegisters>();
    if (threadIdx.x == 0) produce_tiles<D>(maps, smem, bar, blk, index);
    return;
  }

  // ---- Consumers: rotate the group's Q rows, then walk the tiles the producer loads.
  setmaxnreg_inc<kConsumerRegisters>();
  const int consumer = group - 1;
  const int tid = threadIdx.x % 128, warp = tid / 32, lane = tid % 32;
  unsigned char* const s_q = smem + Smem::kQ + consumer * Smem::kQBytes;
  unsigned char* const s_qcap = smem + Smem::kQCap + consumer * Smem::kQBytes;
  const int group_t0 = blk.t_lo + consumer * kGroupRows;
  rotate_group_q<T, D>(p, s_q, s_qcap, group_t0 - blk.pad, tid, bar.q_full);
  named_barrier_sync(kGroupBarrier + consumer, 128);
  const GroupRows rows(p, blk, group_t0 + warp * 16, lane);

  // Tiles this block loads (window tiles without a slot are skipped by every role), so that
  // the second consumer's last turn hands nothing on to a first consumer that has finished.
  int n_tiles = 0;
  for (int it = blk.tile_begin; it < blk.tile_end; ++it) n_tiles += index.needed(blk.tiles[it]);
  if (consumer == 1 && n_tiles > 0) named_barrier_arrive(kTurnBarrier + 0, 256);  // 0 goes first

  float o[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[i][e] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY};  // raw scores (unscaled)
  float row_sum[2] = {0.f, 0.f};              // this thread's share; reduced at the end
  const float scale_log2 = p.scale * 1.4426950408889634f;

  int n = 0;  // tiles consumed
  for (int it = blk.tile_begin; it < blk.tile_end; ++it) {
    const KeyTile tile = blk.tiles[it];
    if (!index.needed(tile)) continue;
    const int stage = n % Smem::kStages;
    mbarrier_wait(&bar.full[stage], (n / Smem::kStages) & 1);
    float s[BN / 8][4];
    score_tile_in_turn<T, D>(s, tile.kind == kGlobalTile ? s_qcap : s_q,
                             smem + Smem::kK + stage * Smem::kTileBytes, consumer,
                             consumer == 0 || n + 1 < n_tiles);
    if (!group_sees_all(blk, index, tile, group_t0)) mask_tile(s, blk, index, rows, tile, lane);
    online_softmax_step(s, row_max, row_sum, o, scale_log2);
    accumulate_pv<T, D>(o, s, smem + Smem::kV + stage * Smem::kTileBytes);
    if (tid == 0) mbarrier_arrive(&bar.empty[stage]);  // this group is done with the stage
    ++n;
  }

  const OutputRows<T> dst(p, partial_out, partial_lse, blk.n_splits, blk.split);
  store_fragment_rows<T, D / 8>(dst, blk.b, blk.head, rows.row_t, blk.pad, o, row_max, row_sum,
                                scale_log2, lane);
#endif  // __CUDA_ARCH_FEAT_SM90_ALL
}

// ---------------------------------------------------------------------------------------------
// Host.

Status map_error(const char* which, cudaError_t error) {
  return Status(StatusCode::kCudaError,
                std::string("lambda_attention_hopper: cuTensorMapEncodeTiled failed for ") +
                    which + ": " + cudaGetErrorString(error));
}

// Byte stride of a dimension of extent 1, whose stride the caller may have left at anything
// (TMA wants a multiple of 16 below 2^40): the packed stride, which it never uses.
uint64_t stride_bytes(int64_t stride, int64_t extent, uint64_t packed) {
  return extent == 1 ? packed : static_cast<uint64_t>(stride) * 2;
}

// A 4D map {D, n_queries, heads, batch} over a strided [batch, heads, n_queries, D] tensor of
// the call (q, or v read in place), boxes of box_rows rows of one 64-column panel.
Status encode_view_map(CUtensorMap* map, const StridedView<const void>& view,
                       const LambdaAttentionParams& p, int64_t heads, int box_rows,
                       const char* which) {
  const auto D = static_cast<uint64_t>(p.head_dim);
  const uint64_t row = view.row_stride * 2;
  const uint64_t head = stride_bytes(view.head_stride, heads, row * p.n_queries);
  const uint64_t dims[4] = {D, static_cast<uint64_t>(p.n_queries), static_cast<uint64_t>(heads),
                            static_cast<uint64_t>(p.batch)};
  const uint64_t strides[3] = {stride_bytes(view.row_stride, p.n_queries, D * 2), head,
                               stride_bytes(view.batch_stride, p.batch, head * heads)};
  const cudaError_t error = sm90::encode_panel_map_nd(map, view.data, p.dtype == DType::kBFloat16,
                                                      4, dims, strides, box_rows);
  return error == cudaSuccess ? Status::Ok() : map_error(which, error);
}

Status encode_maps(const LambdaAttentionParams& p, const AttentionPlan& plan,
                   const unsigned char* workspace, HopperMaps* maps) {
  using sm90::encode_panel_map_nd;
  const bool bf16 = p.dtype == DType::kBFloat16;
  const auto D = static_cast<uint64_t>(p.head_dim);
  const auto n_q = static_cast<uint64_t>(p.n_queries);
  const uint64_t kv_rows = static_cast<uint64_t>(p.batch * p.n_heads_kv);
  const PrefillWorkspace& ws = plan.prefill;
  const auto W = static_cast<uint64_t>(ws.window_rows), G = static_cast<uint64_t>(ws.global_rows);
  Status status = encode_view_map(&maps->q, p.q, p, p.n_heads_q, kGroupRows, "q");
  if (status.ok())
    status = encode_view_map(&maps->chunk_values, p.v, p, p.n_heads_kv, BN, "v");  // in place
  if (!status.ok()) return status;
  const auto packed_3d = [&](CUtensorMap* map, size_t offset, uint64_t rows, const char* which) {
    const uint64_t dims[3] = {D, rows, kv_rows}, strides[2] = {D * 2, rows * D * 2};
    const cudaError_t e = encode_panel_map_nd(map, workspace + offset, bf16, 3, dims, strides, BN);
    return e == cudaSuccess ? Status::Ok() : map_error(which, e);
  };
  status = packed_3d(&maps->keys, ws.keys, W + n_q, "the rotated keys");
  if (status.ok() && W > 0) status = packed_3d(&maps->window_values, ws.values, W, "the window values");
  if (status.ok() && G > 0) status = packed_3d(&maps->global_keys, ws.global_keys, G, "the global keys");
  if (status.ok() && G > 0)
    status = packed_3d(&maps->global_values, ws.global_values, G, "the global values");
  return status;
}

template <typename T, int D>
Status launch(const LambdaAttentionParams& params, const AttentionPlan& plan, void* workspace,
              cudaStream_t stream) {
  constexpr int kSmem = HopperSmem<D>::kAlloc;
  if (reinterpret_cast<uintptr_t>(workspace) % 16 != 0)
    return Status::InvalidArgument("lambda_attention_cuda: workspace must be 16-byte aligned "
                                   "for the Hopper prefill kernel (TMA)");
  HopperMaps maps;
  Status status = encode_maps(params, plan, static_cast<const unsigned char*>(workspace), &maps);
  if (!status.ok()) return status;
  const SplitPartials partials = split_partials(plan, workspace);
  return launch_kernel(lambda_attention_hopper_kernel<T, D>, "lambda_attention_hopper_kernel",
                       prefill_grid(params, plan), kThreads, kSmem, stream, maps, params, plan,
                       static_cast<const unsigned char*>(workspace), partials.out, partials.lse);
}

template <typename T, int D> struct Launcher {
  static constexpr auto run = launch<T, D>;
};

}  // namespace

void plan_hopper_prefill(const LambdaAttentionParams& p, int sm_count, AttentionPlan& plan) {
  plan.path = AttentionPath::kHopper;
  plan.row_tiles = (p.n_queries + BM - 1) / BM;
  plan.n_splits = 1;
  const int64_t blocks = plan.row_tiles * p.n_heads_q * p.batch;
  const int64_t target = sm_count;  // one block per SM (up to 197 KB of shared memory)
  if (blocks > 0 && blocks < target) {
    // Upper bound on the key tiles a block visits: the band (cache window and chunk keys)
    // and the global tiles.
    const int64_t band_keys = min64(p.n_queries, p.n_local + BM) + (p.cache_len > 0 ? p.n_local : 0);
    const int64_t key_tiles = (band_keys + BN - 1) / BN + (p.n_global + BN - 1) / BN;
    plan.n_splits = min64(min64((target + blocks - 1) / blocks, key_tiles), kMaxSplits);
  }
}

Status launch_lambda_attention_hopper(const LambdaAttentionParams& params,
                                      const AttentionPlan& plan, void* workspace,
                                      cudaStream_t stream) {
  return launch_kernel_types<Launcher>(params, params, plan, workspace, stream);
}

}  // namespace lminf::cuda
