#include "memory.h"

#include <cstdlib>
#include <cstring>

namespace lminf::detail {

Status allocate(MemoryKind memory, size_t bytes, void** ptr) {
  if (memory == MemoryKind::kCuda) return cuda_allocate(bytes, ptr);
  const size_t rounded =
      (bytes + kAllocationAlignment - 1) / kAllocationAlignment * kAllocationAlignment;
  *ptr = std::aligned_alloc(kAllocationAlignment, rounded);
  if (*ptr == nullptr) {
    return {StatusCode::kOutOfMemory,
            "host allocation of " + std::to_string(bytes) + " bytes failed"};
  }
  return Status::Ok();
}

void deallocate(MemoryKind memory, void* ptr) {
  if (memory == MemoryKind::kCuda) {
    cuda_deallocate(ptr);
  } else {
    std::free(ptr);
  }
}

Status fill_bytes(MemoryKind memory, void* dst, unsigned char value, size_t bytes, void* stream) {
  if (memory == MemoryKind::kCuda) return cuda_fill_bytes(dst, value, bytes, stream);
  std::memset(dst, value, bytes);
  return Status::Ok();
}

Status copy_from_host(MemoryKind memory, void* dst, const void* src, size_t bytes, void* stream) {
  if (memory == MemoryKind::kCuda) return cuda_copy_from_host(dst, src, bytes, stream);
  std::memcpy(dst, src, bytes);
  return Status::Ok();
}

Status synchronize(MemoryKind memory, void* stream) {
  return memory == MemoryKind::kCuda ? cuda_synchronize(stream) : Status::Ok();
}

}  // namespace lminf::detail
