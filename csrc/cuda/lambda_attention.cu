// lambda_attention_cuda: validation, the launch plan, and dispatch to the kernels.
//
//   bf16/fp16, head_dim 64 or 128, 16-byte aligned rows:
//     n_queries <= 16, full rotary  -> lambda_attention_decode.cu (a KV group's query heads
//                                      share each K/V read; keys split to fill one wave, then
//                                      its own merge)
//     otherwise                     -> rotate_chunk_keys.cu (the pre-pass: keys rotated
//                                      relative to the chunk start, cache window gathered by
//                                      position), then lambda_attention_mma.cu (tensor cores;
//                                      keys split across blocks when fewer than 2 waves, then
//                                      lse_merge.cu), or on sm_90 lambda_attention_hopper.cu
//                                      (wgmma + TMA; LMINF_PREFILL_KERNEL, hopper_prefill.cuh)
//   anything else up to head_dim 256 (float32, odd layouts) -> lambda_attention_generic.cu
// The plan depends on sizes only; batches of different sequences (per-sequence query starts,
// padding, cache-position rows) take the same paths, each kernel reading its sequence's start
// and padding once per block (SequenceRows, lambda_attention_plan.cuh).
#include <cuda_runtime.h>

#include <atomic>
#include <string>

#include "common.cuh"
#include "hopper_prefill.cuh"
#include "lambda_attention_plan.cuh"
#include "lminf/lambda_attention.h"

namespace lminf::cuda {
namespace {

constexpr int64_t kMaxSplits = 128;
constexpr int64_t kGenericMaxHeadDim = 256;

// Multiprocessor count of the current device, read once per device (no host sync, and legal
// while a stream is being captured).
int sm_count() {
  static std::atomic<int> cached[64] = {};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= 64) return 132;
  int count = cached[device].load(std::memory_order_relaxed);
  if (count == 0) {
    if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess)
      return 132;
    cached[device].store(count, std::memory_order_relaxed);
  }
  return count;
}

// Whether the view's pointer is 16-byte aligned and its strides multiples of 8 elements (16
// bytes of bf16/fp16): then every row it holds can move in 16-byte pieces.
template <class T>
bool rows_16_byte_aligned(const StridedView<T>& view) {
  return aligned16(view.data) && view.batch_stride % 8 == 0 && view.head_stride % 8 == 0 &&
         view.row_stride % 8 == 0;
}

// The tensor-core kernel moves rows in 16-byte pieces.
bool tensor_core_eligible(const LambdaAttentionParams& p) {
  if (p.dtype != DType::kBFloat16 && p.dtype != DType::kFloat16) return false;
  if (p.head_dim != 64 && p.head_dim != 128) return false;
  if (p.rotary_dim % 4 != 0) return false;  // lanes rotate frequency pairs as 32-bit words
  // The kernels index the pre-pass rows (window + chunk, global) and their elements in int32.
  if ((p.n_queries + p.n_local + p.n_global + p.cache_len) * p.head_dim >= (int64_t(1) << 31))
    return false;
  if (!rows_16_byte_aligned(p.q) || !rows_16_byte_aligned(p.k) || !rows_16_byte_aligned(p.v) ||
      !rows_16_byte_aligned(p.out))
    return false;
  return p.cache_len == 0 || (rows_16_byte_aligned(p.cache_k) && rows_16_byte_aligned(p.cache_v));
}

size_t round_up_256(size_t bytes) { return (bytes + 255) / 256 * 256; }

// The decode kernel keeps a rotate_half pair (f, f + head_dim/2) in one lane's fragments, and
// counts chunks (times splits), rows and output rows in int32.
bool decode_eligible(const LambdaAttentionParams& p) {
  return p.n_queries <= kDecodeMaxQueries && p.rotary_dim == p.head_dim &&
         p.cache_len < (int64_t(1) << 30) && p.batch * p.n_heads_q * p.n_queries < (1 << 30);
}

// Split-key partials: [rows][n_splits][head_dim] float32, then [rows][n_splits] log-sum-exps.
size_t partials_bytes(const LambdaAttentionParams& p, AttentionPlan& plan) {
  if (plan.n_splits == 1) return 0;
  const auto partials = static_cast<size_t>(p.batch * p.n_heads_q * p.n_queries * plan.n_splits);
  plan.partial_lse_offset = round_up_256(partials * p.head_dim * sizeof(float));
  return plan.partial_lse_offset + round_up_256(partials * sizeof(float));
}

// Decode: a block per (16-row tile of the group's stacked queries, KV head, batch row, split).
// The splits fill one wave (the kernel's occupancy times the SM count) without a second,
// partial one; a split is at least one 64-key chunk.
AttentionPlan plan_decode(const LambdaAttentionParams& p) {
  AttentionPlan plan;
  plan.path = AttentionPath::kDecode;
  plan.heads_per_block = p.n_heads_q / p.n_heads_kv;
  plan.row_tiles = (plan.heads_per_block * p.n_queries + kDecodeTileRows - 1) / kDecodeTileRows;
  const int64_t blocks = plan.row_tiles * p.n_heads_kv * p.batch;
  const int64_t wave = static_cast<int64_t>(sm_count()) * decode_blocks_per_sm(p);
  const int64_t chunks = (p.cache_len + p.n_queries + kDecodeChunkKeys - 1) / kDecodeChunkKeys;
  plan.n_splits = max64(1, min64(min64(wave / blocks, chunks), kMaxSplits));
  plan.workspace_bytes = partials_bytes(p, plan);
  return plan;
}

}  // namespace

AttentionPlan plan_attention(const LambdaAttentionParams& p) {
  if (!tensor_core_eligible(p)) return AttentionPlan{};  // generic: one pass, no workspace
  if (decode_eligible(p)) return plan_decode(p);
  AttentionPlan plan;
  plan.path = AttentionPath::kTensorCore;
  plan.row_tiles = (p.n_queries + kMmaBlockRows - 1) / kMmaBlockRows;
  const int64_t blocks = plan.row_tiles * p.n_heads_q * p.batch;
  const int64_t target = 2 * static_cast<int64_t>(sm_count());  // two resident blocks per SM
  if (blocks > 0 && blocks < target) {
    // Upper bound on the key tiles a block visits: the band (cache window and chunk keys)
    // and the global tiles.
    const int64_t band_keys =
        min64(p.n_queries, p.n_local + kMmaBlockRows) + (p.cache_len > 0 ? p.n_local : 0);
    const int64_t key_tiles = (band_keys + kMmaBlockKeys - 1) / kMmaBlockKeys +
                              (p.n_global + kMmaBlockKeys - 1) / kMmaBlockKeys;
    plan.n_splits = min64(min64((target + blocks - 1) / blocks, key_tiles), kMaxSplits);
  }
  if (hopper_prefill_takes(p)) plan_hopper_prefill(p, sm_count(), plan);  // its tiles and splits
  plan.prefill = plan_prefill_workspace(p, partials_bytes(p, plan));
  plan.workspace_bytes = plan.prefill.end;
  return plan;
}

}  // namespace lminf::cuda

namespace lminf {

size_t lambda_attention_cuda_workspace_size(const LambdaAttentionParams& params) {
  // Sizes only: callers size the workspace before they have the tensors (null pointers are
  // fine here; misaligned ones later only select a path that needs less).
  if (params.n_heads_kv < 1 || params.n_heads_q % params.n_heads_kv != 0 || params.head_dim < 1 ||
      params.batch < 1 || params.n_queries < 1)
    return 0;
  return cuda::plan_attention(params).workspace_bytes;
}

Status lambda_attention_cuda(const LambdaAttentionParams& params, void* workspace, void* stream) {
  Status status = validate(params);
  if (!status.ok()) return status;
  if (params.batch == 0 || params.n_queries == 0) return Status::Ok();
  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  const cuda::AttentionPlan plan = cuda::plan_attention(params);

  if (plan.path == cuda::AttentionPath::kGeneric) {
    if (params.head_dim > cuda::kGenericMaxHeadDim)
      return Status::Unsupported("lambda_attention_cuda: head_dim=" +
                                 std::to_string(params.head_dim) +
                                 " is not supported (at most 256)");
    return cuda::launch_lambda_attention_generic(params, cuda_stream);
  }
  if (params.n_heads_q > 65535 || params.batch > 65535)
    return Status::Unsupported("lambda_attention_cuda: batch=" + std::to_string(params.batch) +
                               " and n_heads_q=" + std::to_string(params.n_heads_q) +
                               " must each be at most 65535");
  if (plan.workspace_bytes > 0 && workspace == nullptr)
    return Status::InvalidArgument("lambda_attention_cuda: workspace must hold " +
                                   std::to_string(plan.workspace_bytes) +
                                   " bytes (lambda_attention_cuda_workspace_size), got null");
  if (plan.path == cuda::AttentionPath::kDecode)
    return cuda::launch_lambda_attention_decode(params, plan, workspace, cuda_stream);
  status = cuda::prefill_kernel_switch_status(plan);
  if (!status.ok()) return status;
  status = cuda::launch_rotate_chunk_keys(params, plan, workspace, cuda_stream);
  if (!status.ok()) return status;
  status = plan.path == cuda::AttentionPath::kHopper
               ? cuda::launch_lambda_attention_hopper(params, plan, workspace, cuda_stream)
               : cuda::launch_lambda_attention_mma(params, plan, workspace, cuda_stream);
  if (!status.ok() || plan.n_splits == 1) return status;
  return cuda::launch_lse_merge(params, plan, workspace, cuda_stream);
}

}  // namespace lminf
