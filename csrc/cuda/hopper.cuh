// Hopper (sm_90a) building blocks for the wgmma + TMA prefill kernel: mbarriers, 2D TMA loads
// with 128-byte swizzle, shared-memory matrix descriptors and warpgroup MMAs (bf16/fp16 in,
// float32 accumulators). Inline PTX only, no CUTLASS. The device functions exist only where
// the compiler targets sm_90a (__CUDA_ARCH_FEAT_SM90_ALL): wgmma and setmaxnreg do not exist
// for plain sm_90. Torch-free.
//
// Shared-memory tiles are stored the way TMA writes them with CU_TENSOR_MAP_SWIZZLE_128B: a
// [rows][head_dim] tile as head_dim / 64 panels of [rows][64] elements (128-byte rows), each
// panel 1024-byte aligned, the 16-byte chunks of row r XOR-ed with r % 8. Descriptors below
// describe exactly that layout; tests/ has a one-tile check of them (csrc/tests/
// test_wgmma_tile.cu), which a GPU run must pass before any kernel built on them is trusted.
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace lminf::cuda::sm90 {

inline constexpr int kPanelElems = 64;  // elements of one 128-byte swizzled row
inline constexpr int kPanelAlign = 1024;  // bytes: one 8-row swizzle atom

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// ---------------------------------------------------------------------------------------------
// mbarriers: a TMA load completes a transaction count on one; consumers wait on its phase.

__device__ __forceinline__ void mbarrier_init(uint64_t* bar, uint32_t arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(arrivals));
}

// Makes initialised barriers visible to the async (TMA) proxy.
__device__ __forceinline__ void fence_barrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

// One arrival that also announces `bytes` of TMA traffic the phase must wait for.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)),
               "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void mbarrier_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}

// Blocks until the barrier's phase with this parity has completed.
__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "wait_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait_%=;\n"
      "}\n" ::"r"(smem_addr(bar)),
      "r"(parity)
      : "memory");
}

// ---------------------------------------------------------------------------------------------
// TMA: one box of a 2D tensor map (x = the contiguous coordinate, in elements) into shared
// memory, completing its bytes on `bar`.

__device__ __forceinline__ void tma_load_2d(void* dst, const CUtensorMap* map, int x, int y,
                                            uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3}], [%4];\n" ::"r"(smem_addr(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(x), "r"(y), "r"(smem_addr(bar))
      : "memory");
}

// Orders this thread's generic-proxy writes to shared memory before later async-proxy reads
// (wgmma operands written by threads, not by TMA).
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// ---------------------------------------------------------------------------------------------
// Matrix descriptors (PTX ISA, "matrix descriptor" of wgmma): start address, leading and
// stride byte offsets (all >> 4), swizzle mode 1 = 128 bytes.

__device__ __forceinline__ uint64_t make_desc(uint32_t start, uint32_t leading_bytes,
                                              uint32_t stride_bytes) {
  return static_cast<uint64_t>((start >> 4) & 0x3FFF) |
         static_cast<uint64_t>((leading_bytes >> 4) & 0x3FFF) << 16 |
         static_cast<uint64_t>((stride_bytes >> 4) & 0x3FFF) << 32 | uint64_t(1) << 62;
}

// A K-major operand (rows of the M or N dimension, K contiguous: Q, or K as the B of Q K^T),
// k16 step `ks` of a panelled tile of `rows` rows. A k16 step is 32 bytes inside one 128-byte
// row; 8-row groups are 1024 bytes apart (the stride offset); the leading offset is unused
// with 128-byte swizzle.
__device__ __forceinline__ uint64_t desc_k_major(const void* tile, int rows, int ks) {
  const uint32_t panel = smem_addr(tile) + (ks / 4) * rows * 128;
  return make_desc(panel + (ks % 4) * 32, 16, 1024);
}

// An MN-major B operand (K rows, N contiguous: V as the B of P V, used with the transpose
// flag), k16 step `ks` of a panelled tile of `rows` K rows: the step starts 16 rows (2048
// bytes) further; 8-row groups along K are 1024 bytes apart (stride offset); the 64-element
// panels along N are rows * 128 bytes apart (leading offset).
__device__ __forceinline__ uint64_t desc_mn_major(const void* tile, int rows, int ks) {
  return make_desc(smem_addr(tile) + ks * 16 * 128, rows * 128, 1024);
}

// ---------------------------------------------------------------------------------------------
// Warpgroup MMA. fence before the first wgmma that touches accumulators written by other
// instructions; commit groups the issued wgmmas; wait<N> leaves at most N groups in flight.

__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int kPending> __device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}

// Accumulators stay in registers across the asm statements: "+f" ties each to its register.
// d[32] (+)= A[64x16] * B[16x64], A and B from shared memory, both K-major.
#define LMINF_WGMMA_SS_M64N64K16(TYPE)                                                          \
  asm volatile(                                                                                 \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                              \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE " "                           \
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                 \
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "      \
      "%32, %33, p, 1, 1, 0, 0;\n}\n"                                                           \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),     \
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), \
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]),           \
        "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]),           \
        "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])            \
      : "l"(desc_a), "l"(desc_b), "r"(accumulate))

template <typename T>
__device__ __forceinline__ void wgmma_ss_m64n64k16(float (&d)[32], uint64_t desc_a,
                                                   uint64_t desc_b, int accumulate);
template <>
__device__ __forceinline__ void wgmma_ss_m64n64k16<__nv_bfloat16>(float (&d)[32], uint64_t desc_a,
                                                                  uint64_t desc_b,
                                                                  int accumulate) {
  LMINF_WGMMA_SS_M64N64K16("bf16");
}
template <>
__device__ __forceinline__ void wgmma_ss_m64n64k16<__half>(float (&d)[32], uint64_t desc_a,
                                                           uint64_t desc_b, int accumulate) {
  LMINF_WGMMA_SS_M64N64K16("f16");
}
#undef LMINF_WGMMA_SS_M64N64K16

// d[64] (+)= A[64x16] * B[16x128], A from registers (the mma.sync A-fragment layout per warp:
// the accumulator of Q K^T packed to T), B from shared memory MN-major (transposed).
#define LMINF_WGMMA_RS_M64N128K16(TYPE)                                                         \
  asm volatile(                                                                                 \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                              \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE " "                          \
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                 \
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "       \
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "       \
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "      \
      "{%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"                                             \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),     \
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), \
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]),           \
        "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]),           \
        "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),           \
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]),           \
        "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]),           \
        "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]),           \
        "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),           \
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]),           \
        "+f"(d[62]), "+f"(d[63])                                                                \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate))

template <typename T>
__device__ __forceinline__ void wgmma_rs_m64n128k16(float (&d)[64], const uint32_t (&a)[4],
                                                    uint64_t desc_b, int accumulate);
template <>
__device__ __forceinline__ void wgmma_rs_m64n128k16<__nv_bfloat16>(float (&d)[64],
                                                                   const uint32_t (&a)[4],
                                                                   uint64_t desc_b,
                                                                   int accumulate) {
  LMINF_WGMMA_RS_M64N128K16("bf16");
}
template <>
__device__ __forceinline__ void wgmma_rs_m64n128k16<__half>(float (&d)[64], const uint32_t (&a)[4],
                                                            uint64_t desc_b, int accumulate) {
  LMINF_WGMMA_RS_M64N128K16("f16");
}
#undef LMINF_WGMMA_RS_M64N128K16

#endif  // __CUDA_ARCH_FEAT_SM90_ALL

// ---------------------------------------------------------------------------------------------
// Host: the tensor map of a row-major [rows][cols] bf16/fp16 matrix (row stride in elements,
// a multiple of 8) whose TMA box is [box_rows][64] with 128-byte swizzle, i.e. one panel.
// cuTensorMapEncodeTiled is a driver function: it is looked up through the runtime, so the
// library links no libcuda.
inline cudaError_t encode_panel_map(CUtensorMap* map, const void* base, bool bf16, uint64_t cols,
                                    uint64_t rows, uint64_t row_stride, uint32_t box_rows) {
  using Encode = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*,
                              const cuuint64_t*, const cuuint64_t*, const cuuint32_t*,
                              const cuuint32_t*, CUtensorMapInterleave, CUtensorMapSwizzle,
                              CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
  static Encode encode = nullptr;
  if (encode == nullptr) {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found;
    const cudaError_t error = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn,
                                                               12000, cudaEnableDefault, &found);
    if (error != cudaSuccess) return error;
    if (found != cudaDriverEntryPointSuccess || fn == nullptr) return cudaErrorNotSupported;
    encode = reinterpret_cast<Encode>(fn);
  }
  const cuuint64_t dims[2] = {cols, rows};
  const cuuint64_t strides[1] = {row_stride * 2};  // bytes, for dimension 1
  const cuuint32_t box[2] = {kPanelElems, box_rows};
  const cuuint32_t element_strides[2] = {1, 1};
  const CUresult result = encode(
      map, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 2,
      const_cast<void*>(base), dims, strides, box, element_strides,
      CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
      CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return result == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

}  // namespace lminf::cuda::sm90
