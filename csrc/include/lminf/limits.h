// The range of sizes and positions the kernels accept.
#pragma once

#include <cstdint>

#include "lminf/export.h"
#include "lminf/status.h"

namespace lminf {

// Every size, window, count and position the entry points take is at most 2^62, and so are
// n_global + n_local and a chunk's last position, so that the sums the kernels form (a window
// plus a tile, a position plus a distance) never overflow int64. validate() refuses larger
// values, naming the field.
inline constexpr int64_t kMaxPosition = int64_t{1} << 62;

// Ok when a chunk of `count` tokens starting at position `start` lies within [0, 2^62];
// otherwise InvalidArgument naming `name`. The CPU entry points check the positions they
// read from host memory with it (CUDA ones cannot read device memory without a sync).
LMINF_API Status validate_position(const char* name, int64_t start, int64_t count);

// The per-sequence form, for host memory: each padding[b] (null: none) in [0, n_rows] and each
// sequence's real rows, n_rows - padding[b] tokens from start[b * start_stride], within
// [0, 2^62]. The message names start_name or padding and the sequence.
LMINF_API Status validate_sequence_positions(const char* start_name, const int64_t* start,
                                             int64_t start_stride, const int64_t* padding,
                                             int64_t batch, int64_t n_rows);

}  // namespace lminf
