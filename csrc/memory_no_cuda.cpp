// The CUDA memory functions in a build without CUDA: every one reports kUnsupported.
#include "memory.h"

namespace lminf::detail {
namespace {

Status not_built() {
  return Status::Unsupported("lminf was built without CUDA (configure with -DLMINF_CUDA=ON)");
}

}  // namespace

Status cuda_allocate(size_t, void**) { return not_built(); }
void cuda_deallocate(void*) {}
Status cuda_fill_bytes(void*, unsigned char, size_t, void*) { return not_built(); }
Status cuda_copy_from_host(void*, const void*, size_t, void*) { return not_built(); }
Status cuda_synchronize(void*) { return not_built(); }

}  // namespace lminf::detail
