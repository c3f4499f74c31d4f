// Allocation and small writes in host or CUDA memory, so that KVCache is written once for both.
// Internal: not installed.
#pragma once

#include <cstddef>

#include "lminf/kv_cache.h"
#include "lminf/status.h"

namespace lminf::detail {

// Allocates `bytes` bytes aligned to kAllocationAlignment in `memory`.
Status allocate(MemoryKind memory, size_t bytes, void** ptr);
void deallocate(MemoryKind memory, void* ptr);

// Sets `bytes` bytes at dst to `value`. CUDA: enqueued on `stream`.
Status fill_bytes(MemoryKind memory, void* dst, unsigned char value, size_t bytes, void* stream);

// Copies `bytes` bytes from host memory to dst. CUDA: enqueued on `stream`; src may be reused
// as soon as the call returns.
Status copy_from_host(MemoryKind memory, void* dst, const void* src, size_t bytes, void* stream);

// Waits until the work enqueued on `stream` is done (a no-op for host memory).
Status synchronize(MemoryKind memory, void* stream);

// The CUDA halves of the functions above: memory_cuda.cpp in a CUDA build, kUnsupported
// stubs in memory_no_cuda.cpp otherwise.
Status cuda_allocate(size_t bytes, void** ptr);
void cuda_deallocate(void* ptr);
Status cuda_fill_bytes(void* dst, unsigned char value, size_t bytes, void* stream);
Status cuda_copy_from_host(void* dst, const void* src, size_t bytes, void* stream);
Status cuda_synchronize(void* stream);

// cudaMalloc guarantees 256 bytes; host allocations match it so that carved sub-buffers are
// aligned the same way everywhere.
inline constexpr size_t kAllocationAlignment = 256;

}  // namespace lminf::detail
