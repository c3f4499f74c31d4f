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

}  // namespace lminf
