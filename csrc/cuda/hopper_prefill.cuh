// The Hopper prefill kernel (lambda_attention_hopper.cu) as the planner sees it: which
// tensor-core kernel a call takes, the Hopper kernel's tiles and splits, its launcher.
//
// The switch: environment variable LMINF_PREFILL_KERNEL, read once per process:
//   unset, "" or "auto"  the Hopper kernel wherever it can run (built for sm_90a and the
//                        current device is compute capability 9.0), else the mma.sync kernel;
//   "hopper"             the Hopper kernel, and an error (kUnsupported, naming the variable)
//                        for a tensor-core call where it cannot run: no silent fallback in an
//                        A/B run;
//   "mma"                the mma.sync kernel of lambda_attention_mma.cu everywhere.
// Either kernel reads the same pre-pass rows (rotate_chunk_keys.cu) and writes the same split
// partials (lse_merge.cu), so only the block shape and the split count differ.
//
// The Hopper kernel exists where the build compiles lambda_attention_hopper.cu for sm_90a and
// defines LMINF_WITH_HOPPER_KERNEL (setup.py, CMakeLists.txt: when sm_90 is targeted and nvcc
// is 12.3 or newer); elsewhere the stubs below keep every call on the mma.sync kernel.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

#include "lambda_attention_plan.cuh"
#include "lminf/lambda_attention.h"
#include "lminf/status.h"

namespace lminf::cuda {

// 128 query rows per block (two consumer warpgroups of 64), 128 keys per tile.
inline constexpr int kHopperBlockRows = 128;
inline constexpr int kHopperBlockKeys = 128;

enum class PrefillKernelChoice { kAuto, kHopper, kMma, kInvalid };

// LMINF_PREFILL_KERNEL, parsed once.
inline PrefillKernelChoice prefill_kernel_choice() {
  static const PrefillKernelChoice choice = [] {
    const char* value = std::getenv("LMINF_PREFILL_KERNEL");
    if (value == nullptr || *value == '\0' || std::strcmp(value, "auto") == 0)
      return PrefillKernelChoice::kAuto;
    if (std::strcmp(value, "hopper") == 0) return PrefillKernelChoice::kHopper;
    if (std::strcmp(value, "mma") == 0) return PrefillKernelChoice::kMma;
    return PrefillKernelChoice::kInvalid;
  }();
  return choice;
}

// Whether the current device is compute capability 9.0 (sm_90a code runs nowhere else), read
// once per device.
inline bool device_is_sm90() {
  static std::atomic<int> cached[64] = {};  // 0 unknown, 1 no, 2 yes
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= 64) return false;
  int state = cached[device].load(std::memory_order_relaxed);
  if (state == 0) {
    int major = 0, minor = 0;
    const bool ok =
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess &&
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) == cudaSuccess;
    state = ok && major == 9 && minor == 0 ? 2 : 1;
    cached[device].store(state, std::memory_order_relaxed);
  }
  return state == 2;
}

#if defined(LMINF_WITH_HOPPER_KERNEL)
inline constexpr bool kHopperKernelBuilt = true;
// lambda_attention_hopper.cu: the plan's path, row tiles (128 rows) and key splits for a call
// plan_attention sends to the tensor-core path.
void plan_hopper_prefill(const LambdaAttentionParams& params, int sm_count, AttentionPlan& plan);
Status launch_lambda_attention_hopper(const LambdaAttentionParams& params,
                                      const AttentionPlan& plan, void* workspace,
                                      cudaStream_t stream);
#else
inline constexpr bool kHopperKernelBuilt = false;
inline void plan_hopper_prefill(const LambdaAttentionParams&, int, AttentionPlan&) {}
inline Status launch_lambda_attention_hopper(const LambdaAttentionParams&, const AttentionPlan&,
                                             void*, cudaStream_t) {
  return Status::Unsupported("lambda_attention_cuda: this build has no Hopper prefill kernel");
}
#endif

// Whether a call that plan_attention sends to the tensor-core path runs the Hopper kernel.
// Batches whose sequences sit at different positions or carry padding take the mma.sync
// kernel: the Hopper kernel reads the pre-pass's shared index row and numbers chunk key rows
// from the chunk's first row, not per sequence from its first real row (NOTES.md, batches).
inline bool hopper_prefill_takes(const LambdaAttentionParams& params) {
  const PrefillKernelChoice choice = prefill_kernel_choice();
  return kHopperKernelBuilt &&
         (choice == PrefillKernelChoice::kAuto || choice == PrefillKernelChoice::kHopper) &&
         device_is_sm90() && sequences_share_positions(params);
}

// The switch's error for a tensor-core call, if any: an unknown value, or "hopper" where the
// Hopper kernel cannot run.
inline Status prefill_kernel_switch_status(const AttentionPlan& plan) {
  switch (prefill_kernel_choice()) {
    case PrefillKernelChoice::kInvalid:
      return Status::InvalidArgument(std::string("LMINF_PREFILL_KERNEL must be auto, hopper or "
                                                 "mma, got '") +
                                     std::getenv("LMINF_PREFILL_KERNEL") + "'");
    case PrefillKernelChoice::kHopper:
      if (plan.path != AttentionPath::kHopper)
        return Status::Unsupported(
            std::string("LMINF_PREFILL_KERNEL=hopper, but the Hopper prefill kernel cannot run "
                        "here: ") +
            (!kHopperKernelBuilt ? "this build has no sm_90a code (LMINF_CUDA_ARCHS without 90, "
                                   "or nvcc older than 12.3)"
             : !device_is_sm90() ? "the device is not compute capability 9.0"
                                 : "a batch with padding or per-sequence positions (the Hopper "
                                   "kernel reads only a batch that shares its positions)"));
      return Status::Ok();
    default:
      return Status::Ok();
  }
}

}  // namespace lminf::cuda
