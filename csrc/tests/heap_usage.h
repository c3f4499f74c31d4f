// Bytes the process has allocated on the heap and not yet freed, for tests that memory stays
// constant. Under AddressSanitizer malloc is ASan's, so ask ASan; otherwise ask glibc.
#pragma once

#include <cstddef>

#if defined(__SANITIZE_ADDRESS__)
// From <sanitizer/allocator_interface.h>, which not every toolchain ships.
extern "C" size_t __sanitizer_get_current_allocated_bytes();
#else
#include <malloc.h>
#endif

namespace lminf_test {

inline size_t heap_bytes_in_use() {
#if defined(__SANITIZE_ADDRESS__)
  return __sanitizer_get_current_allocated_bytes();
#else
  return mallinfo2().uordblks;
#endif
}

}  // namespace lminf_test
