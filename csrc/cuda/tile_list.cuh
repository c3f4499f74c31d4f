// The key tiles a block of queries visits, in the same order in every thread of the block.
#pragma once

#include <cstdint>

#include "common.cuh"
#include "lminf/lambda_attention.h"
#include "lminf/lambda_mask.h"

namespace lminf::cuda {

// kTileKeys keys: cache slots [first, first + kTileKeys) or chunk tokens [first, ...).
struct KeyTile {
  bool from_cache;
  int64_t first;
};

// For the real query rows t in [t_lo, t_hi] of a sequence (positions qs + t; none when t_hi <
// t_lo) and its chunk of n_chunk real rows: every cache tile (a ring's slots carry arbitrary
// positions, so per-element masks decide), the chunk tiles holding global keys that some query
// sees beyond its window, and the chunk tiles of the band, keys t_lo - n_local + 1 .. t_hi.
// Chunk tiles outside those are never visited.
template <int kTileKeys> struct TileList {
  int64_t cache_tiles, global_tiles, local_begin, count;

  __device__ TileList(const LambdaAttentionParams& p, int64_t qs, int64_t t_lo, int64_t t_hi,
                      int64_t n_chunk) {
    cache_tiles = (p.cache_len + kTileKeys - 1) / kTileKeys;
    const KeyRange<int64_t> band = local_keys_of_any(t_lo, t_hi, p.n_local);  // chunk rows
    local_begin = max64(0, band.first) / kTileKeys;
    const int64_t local_end = band.last / kTileKeys + 1;
    // Chunk rows holding the global keys the last row sees (positions qs + u).
    const int64_t n_global_keys =
        max64(0, min64(global_keys(qs + t_hi, p.n_global, p.n_local).last + 1 - qs, n_chunk));
    // Global tiles that the band does not already cover.
    global_tiles = min64((n_global_keys + kTileKeys - 1) / kTileKeys, local_begin);
    count = t_hi < t_lo ? 0 : cache_tiles + global_tiles + (local_end - local_begin);
  }

  __device__ KeyTile operator[](int64_t index) const {
    if (index < cache_tiles) return {true, index * kTileKeys};
    index -= cache_tiles;
    if (index < global_tiles) return {false, index * kTileKeys};
    return {false, (local_begin + index - global_tiles) * kTileKeys};
  }
};

}  // namespace lminf::cuda
