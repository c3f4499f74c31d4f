// The key tiles a block of the tensor-core kernel visits (over the pre-pass rows of
// rotate_chunk_keys.cu), in the same order in every thread of the block.
#pragma once

#include <cstdint>

#include "common.cuh"
#include "lambda_attention_plan.cuh"
#include "lminf/lambda_mask.h"

namespace lminf::cuda {

// kTileKeys keys: rows [first, first + kTileKeys) of the global tile (global keys at positions
// first, ...) or of the pre-pass key sequence (window, then chunk; PrefillWorkspace).
struct PrefillTile {
  bool global;
  int first;
};

// For the real query rows t in [t_lo, t_hi] of a sequence (positions a + t, t counted from its
// first real row; none when t_hi < t_lo, a block of padding rows only): the global tiles holding
// the positions j < n_global that some query sees beyond its window (j <= a + t_hi - n_local),
// then the tiles of the band, key rows t_lo + window_rows - n_local + 1 .. t_hi + window_rows
// (row u sits at position a - window_rows + u). Rows outside those are never visited.
template <int kTileKeys> struct PrefillTileList {
  int global_tiles, band_begin, count;

  __device__ PrefillTileList(const LambdaAttentionParams& p, int64_t a, int window_rows, int t_lo,
                      int t_hi) {
    // The last row sees every global key any row sees; the band, in key rows (the key of real
    // row t is key row t + window_rows).
    const int64_t n_global_keys = global_keys(a + t_hi, p.n_global, p.n_local).size();
    global_tiles = static_cast<int>((n_global_keys + kTileKeys - 1) / kTileKeys);
    const KeyRange<int> band = local_keys_of_any(t_lo + window_rows, t_hi + window_rows,
                                                 static_cast<int>(p.n_local));
    band_begin = max(0, band.first) / kTileKeys;
    const int band_end = band.last / kTileKeys + 1;
    count = t_hi < t_lo ? 0 : global_tiles + band_end - band_begin;
  }

  __device__ PrefillTile operator[](int index) const {
    if (index < global_tiles) return {true, index * kTileKeys};
    return {false, (band_begin + index - global_tiles) * kTileKeys};
  }
};

}  // namespace lminf::cuda
