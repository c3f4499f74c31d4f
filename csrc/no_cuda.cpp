// CUDA entry points of a build without CUDA: they exist so that callers link either way,
// and they say plainly why nothing ran.
#include "lminf/lambda_attention.h"
#include "lminf/ring_kv_cache.h"

namespace lminf {
namespace {
Status not_built() { return Status::Unsupported("lminf was built without CUDA (-DLMINF_CUDA=ON)"); }
}  // namespace

size_t lambda_attention_cuda_workspace_size(const LambdaAttentionParams&) { return 0; }
Status lambda_attention_cuda(const LambdaAttentionParams&, void*, void*) { return not_built(); }
Status ring_cache_append_cuda(const RingCacheAppendParams&, void*) { return not_built(); }

}  // namespace lminf
