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

// The same for 3D and 4D maps (x, y, then the outer coordinates: head, batch row).
__device__ __forceinline__ void tma_load_3d(void* dst, const CUtensorMap* map, int x, int y, int z,
                                            uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3, %4}], [%5];\n" ::"r"(smem_addr(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(x), "r"(y), "r"(z), "r"(smem_addr(bar))
      : "memory");
}
__device__ __forceinline__ void tma_load_4d(void* dst, const CUtensorMap* map, int x, int y, int z,
                                            int w, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3, %4, %5}], [%6];\n" ::"r"(smem_addr(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(x), "r"(y), "r"(z), "r"(w), "r"(smem_addr(bar))
      : "memory");
}

// Fetches a tensor map (a __grid_constant__ kernel parameter) into the TMA unit's cache ahead
// of its first use.
__device__ __forceinline__ void prefetch_tensor_map(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
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
// Warpgroup MMA. fence before the first wgmma that touches accumulators or A registers written
// by other instructions; commit groups the issued wgmmas; wait<N> leaves at most N groups in
// flight. Accumulators are d[N / 8][4]: n8 block i of the m64nN result, in the mma.sync C
// layout per warp (warp w of the warpgroup holds rows 16w .. 16w + 15; d[i][0..1] at row
// 16w + lane/4, columns 8i + 2(lane%4) + {0, 1}; d[i][2..3] eight rows further down).

__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int kPending> __device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}

// Pins accumulator registers in place across an asynchronous wgmma: the compiler may neither
// read them nor move them between the issue and the wait (CUTLASS's warpgroup_fence_operand).
template <int kN> __device__ __forceinline__ void fence_operands(float (&d)[kN][4]) {
#pragma unroll
  for (int i = 0; i < kN; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(d[i][e])::"memory");
}

#define LMINF_ACC4(i) "+f"(d[i][0]), "+f"(d[i][1]), "+f"(d[i][2]), "+f"(d[i][3])
#define LMINF_ACC_N64                                                                          \
  LMINF_ACC4(0), LMINF_ACC4(1), LMINF_ACC4(2), LMINF_ACC4(3), LMINF_ACC4(4), LMINF_ACC4(5),     \
      LMINF_ACC4(6), LMINF_ACC4(7)
#define LMINF_ACC_N128                                                                         \
  LMINF_ACC_N64, LMINF_ACC4(8), LMINF_ACC4(9), LMINF_ACC4(10), LMINF_ACC4(11), LMINF_ACC4(12), \
      LMINF_ACC4(13), LMINF_ACC4(14), LMINF_ACC4(15)
#define LMINF_D32 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "      \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define LMINF_D64 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "      \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "    \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "    \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"

// d (+)= A[64x16] * B[16xN]: A and B from shared memory, both K-major (trans flags 0).
// `accumulate` 0 overwrites d.
#define LMINF_WGMMA_SS(N, TYPE, ACC, DREGS, A, B, P)                                           \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" #P ", 0;\n"                                 \
               "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TYPE "." TYPE " {" DREGS      \
               "}, %" #A ", %" #B ", p, 1, 1, 0, 0;\n}\n"                                       \
               : ACC                                                                            \
               : "l"(desc_a), "l"(desc_b), "r"(accumulate))

// d (+)= A[64x16] * B[16xN]: A from registers (per warp, the mma.sync m16n8k16 A fragment of
// its 16 rows: a[0] row lane/4 columns 2(lane%4) + {0,1}, a[1] 8 rows down, a[2], a[3] the same
// 8 columns right), B from shared memory MN-major (the transpose flag 1).
#define LMINF_WGMMA_RS(N, TYPE, ACC, DREGS, AREGS, B, P)                                       \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" #P ", 0;\n"                                 \
               "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TYPE "." TYPE " {" DREGS      \
               "}, {" AREGS "}, %" #B ", p, 1, 1, 1;\n}\n"                                      \
               : ACC                                                                            \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate))

template <typename T, int N> struct Wgmma;
template <> struct Wgmma<__nv_bfloat16, 64> {
  __device__ __forceinline__ static void ss(float (&d)[8][4], uint64_t desc_a, uint64_t desc_b,
                                            int accumulate) {
    LMINF_WGMMA_SS(64, "bf16", LMINF_ACC_N64, LMINF_D32, 32, 33, 34);
  }
  __device__ __forceinline__ static void rs(float (&d)[8][4], const uint32_t (&a)[4],
                                            uint64_t desc_b, int accumulate) {
    LMINF_WGMMA_RS(64, "bf16", LMINF_ACC_N64, LMINF_D32, "%32, %33, %34, %35", 36, 37);
  }
};
template <> struct Wgmma<__half, 64> {
  __device__ __forceinline__ static void ss(float (&d)[8][4], uint64_t desc_a, uint64_t desc_b,
                                            int accumulate) {
    LMINF_WGMMA_SS(64, "f16", LMINF_ACC_N64, LMINF_D32, 32, 33, 34);
  }
  __device__ __forceinline__ static void rs(float (&d)[8][4], const uint32_t (&a)[4],
                                            uint64_t desc_b, int accumulate) {
    LMINF_WGMMA_RS(64, "f16", LMINF_ACC_N64, LMINF_D32, "%32, %33, %34, %35", 36, 37);
  }
};
template <> struct Wgmma<__nv_bfloat16, 128> {
  __device__ __forceinline__ static void ss(float (&d)[16][4], uint64_t desc_a, uint64_t desc_b,
                                            int accumulate) {
    LMINF_WGMMA_SS(128, "bf16", LMINF_ACC_N128, LMINF_D64, 64, 65, 66);
  }
  __device__ __forceinline__ static void rs(float (&d)[16][4], const uint32_t (&a)[4],
                                            uint64_t desc_b, int accumulate) {
    LMINF_WGMMA_RS(128, "bf16", LMINF_ACC_N128, LMINF_D64, "%64, %65, %66, %67", 68, 69);
  }
};
template <> struct Wgmma<__half, 128> {
  __device__ __forceinline__ static void ss(float (&d)[16][4], uint64_t desc_a, uint64_t desc_b,
                                            int accumulate) {
    LMINF_WGMMA_SS(128, "f16", LMINF_ACC_N128, LMINF_D64, 64, 65, 66);
  }
  __device__ __forceinline__ static void rs(float (&d)[16][4], const uint32_t (&a)[4],
                                            uint64_t desc_b, int accumulate) {
    LMINF_WGMMA_RS(128, "f16", LMINF_ACC_N128, LMINF_D64, "%64, %65, %66, %67", 68, 69);
  }
};
#undef LMINF_WGMMA_SS
#undef LMINF_WGMMA_RS
#undef LMINF_ACC4
#undef LMINF_ACC_N64
#undef LMINF_ACC_N128
#undef LMINF_D32
#undef LMINF_D64

// ---------------------------------------------------------------------------------------------
// Warp specialisation: register budgets per warpgroup and named barriers.

// Moves registers between warpgroups: every thread of the warpgroup executes it. The budgets
// of a block must fit the register file (384 threads: 24 + 2 x 240 per lane of 128).
template <int kRegisters> __device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
}
template <int kRegisters> __device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
}

// Hardware barrier `id` (1..15; 0 is __syncthreads) over `threads` threads (a multiple of 32):
// sync waits for the count, arrive only adds this warp's threads.
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

#endif  // __CUDA_ARCH_FEAT_SM90_ALL

// ---------------------------------------------------------------------------------------------
// Host: tensor maps. cuTensorMapEncodeTiled is a driver function: it is looked up through the
// runtime, so the library links no libcuda.

// The tensor map of a bf16/fp16 tensor of `rank` (2..5) dimensions, dims[0] the contiguous one
// (elements), strides[i] the byte stride of dimension i + 1 (multiples of 16), whose TMA box is
// one panel [box_rows][64] (dims[0] >= 64) with 128-byte swizzle and 1 along the outer
// dimensions. Reads outside dims fill zeros (and still count their bytes on the mbarrier).
inline cudaError_t encode_panel_map_nd(CUtensorMap* map, const void* base, bool bf16, int rank,
                                       const uint64_t* dims, const uint64_t* strides,
                                       uint32_t box_rows) {
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
  if (rank < 2 || rank > 5) return cudaErrorInvalidValue;
  cuuint64_t global_dims[5], global_strides[4];
  cuuint32_t box[5], element_strides[5];
  for (int i = 0; i < rank; ++i) {
    global_dims[i] = dims[i];
    box[i] = i == 0 ? kPanelElems : i == 1 ? box_rows : 1;
    element_strides[i] = 1;
    if (i > 0) global_strides[i - 1] = strides[i - 1];
  }
  const CUresult result = encode(
      map, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
      static_cast<cuuint32_t>(rank), const_cast<void*>(base), global_dims, global_strides, box,
      element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
      CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return result == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

// A row-major [rows][cols] matrix (row stride in elements, a multiple of 8).
inline cudaError_t encode_panel_map(CUtensorMap* map, const void* base, bool bf16, uint64_t cols,
                                    uint64_t rows, uint64_t row_stride, uint32_t box_rows) {
  const uint64_t dims[2] = {cols, rows};
  const uint64_t strides[1] = {row_stride * 2};
  return encode_panel_map_nd(map, base, bf16, 2, dims, strides, box_rows);
}

}  // namespace lminf::cuda::sm90
