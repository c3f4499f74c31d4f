// One tile of the Hopper prefill kernel's arithmetic against a float reference on the host:
// TMA loads (128-byte swizzle, two 64-column panels per 128-wide tile) into an mbarrier, then
// S = Q K^T by wgmma with both operands in shared memory (K-major descriptors), and O = P V
// with P = S rounded to bf16 taken from registers and V as an MN-major (transposed) operand.
// It checks csrc/cuda/hopper.cuh's descriptors, swizzle and fragment layouts in a second of
// GPU time, before any kernel is built on them. Skipped (exit code 77) without a Hopper GPU.
//
//   build/cuda/csrc/tests/test_wgmma_tile       # prints the errors; exit 0 when they are small
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "cuda/hopper.cuh"

namespace {

using lminf::cuda::sm90::kPanelAlign;
using lminf::cuda::sm90::kPanelElems;
using T = __nv_bfloat16;

constexpr int kRows = 64;   // queries = keys of the tile (one warpgroup: 64 rows)
constexpr int kDim = 128;   // head_dim: two panels
constexpr int kThreads = 128;
constexpr int kPanelBytes = kRows * kPanelElems * 2;
constexpr int kTileBytes = 2 * kPanelBytes;

struct Maps {
  CUtensorMap q, k, v;
};

__global__ void __launch_bounds__(kThreads) wgmma_tile_kernel(const __grid_constant__ Maps maps,
                                                              float* s_out, float* o_out) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using namespace lminf::cuda::sm90;
  // The swizzle atoms need 1024-byte aligned panels; the launch adds that much slack.
  extern __shared__ unsigned char smem_raw[];
  unsigned char* const smem = smem_raw + (kPanelAlign - smem_addr(smem_raw) % kPanelAlign) % kPanelAlign;
  unsigned char* const q = smem;
  unsigned char* const k = smem + kTileBytes;
  unsigned char* const v = smem + 2 * kTileBytes;
  auto* const bar = reinterpret_cast<uint64_t*>(smem + 3 * kTileBytes);
  if (threadIdx.x == 0) {
    mbarrier_init(bar, 1);
    fence_barrier_init();
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    mbarrier_arrive_expect_tx(bar, 3 * kTileBytes);
    for (int panel = 0; panel < 2; ++panel) {
      tma_load_2d(q + panel * kPanelBytes, &maps.q, panel * kPanelElems, 0, bar);
      tma_load_2d(k + panel * kPanelBytes, &maps.k, panel * kPanelElems, 0, bar);
      tma_load_2d(v + panel * kPanelBytes, &maps.v, panel * kPanelElems, 0, bar);
    }
  }
  mbarrier_wait(bar, 0);

  float s[32] = {};
  wgmma_fence();
#pragma unroll
  for (int ks = 0; ks < kDim / 16; ++ks)
    wgmma_ss_m64n64k16<T>(s, desc_k_major(q, kRows, ks), desc_k_major(k, kRows, ks), ks > 0);
  wgmma_commit();
  wgmma_wait<0>();

  // Accumulator layout: warp w holds rows 16w..16w+15; n8 block i of the thread's fragment is
  // s[4i..4i+1] at row 16w + lane/4, columns 8i + 2(lane%4) + {0, 1}, and s[4i+2..4i+3] 8 rows
  // further down (the mma.sync C layout, repeated along N).
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row = 16 * warp + lane / 4, col = 2 * (lane % 4);
  for (int i = 0; i < 8; ++i)
    for (int e = 0; e < 4; ++e)
      s_out[(row + 8 * (e / 2)) * kRows + 8 * i + col + e % 2] = s[4 * i + e];

  // P as the A operand from registers: k16 step kk is n8 blocks 2kk and 2kk + 1.
  uint32_t p[4][4];
  for (int kk = 0; kk < 4; ++kk)
    for (int r = 0; r < 4; ++r) {
      const __nv_bfloat162 pair = __floats2bfloat162_rn(s[8 * kk + 2 * r], s[8 * kk + 2 * r + 1]);
      p[kk][r] = *reinterpret_cast<const uint32_t*>(&pair);
    }
  float o[64] = {};
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < 4; ++kk)
    wgmma_rs_m64n128k16<T>(o, p[kk], desc_mn_major(v, kRows, kk), kk > 0);
  wgmma_commit();
  wgmma_wait<0>();
  for (int i = 0; i < 16; ++i)
    for (int e = 0; e < 4; ++e)
      o_out[(row + 8 * (e / 2)) * kDim + 8 * i + col + e % 2] = o[4 * i + e];
#endif
}

float bf16_round(float x) { return __bfloat162float(__float2bfloat16_rn(x)); }

double max_rel_error(const std::vector<float>& got, const std::vector<double>& want) {
  double err = 0, scale = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    err = std::fmax(err, std::fabs(got[i] - want[i]));
    scale = std::fmax(scale, std::fabs(want[i]));
  }
  return err / scale;
}

}  // namespace

int main() {
  int device = 0;
  cudaDeviceProp prop{};
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaGetDeviceProperties(&prop, device) != cudaSuccess || prop.major != 9) {
    std::printf("skipped: needs a Hopper (sm_90) GPU\n");
    return 77;
  }
  std::mt19937 rng(0);
  std::uniform_real_distribution<float> uniform(-1.f, 1.f);
  std::vector<T> host[3];
  for (auto& m : host) {
    m.resize(kRows * kDim);
    for (auto& x : m) x = __float2bfloat16_rn(uniform(rng));
  }
  T* dev[3];
  Maps maps;
  CUtensorMap* map_of[3] = {&maps.q, &maps.k, &maps.v};
  for (int m = 0; m < 3; ++m) {
    if (cudaMalloc(&dev[m], kRows * kDim * sizeof(T)) != cudaSuccess) return 1;
    cudaMemcpy(dev[m], host[m].data(), kRows * kDim * sizeof(T), cudaMemcpyHostToDevice);
    if (lminf::cuda::sm90::encode_panel_map(map_of[m], dev[m], true, kDim, kRows, kDim, kRows) !=
        cudaSuccess) {
      std::printf("FAIL: cuTensorMapEncodeTiled\n");
      return 1;
    }
  }
  float *s_dev, *o_dev;
  cudaMalloc(&s_dev, kRows * kRows * sizeof(float));
  cudaMalloc(&o_dev, kRows * kDim * sizeof(float));
  cudaMemset(s_dev, 0xff, kRows * kRows * sizeof(float));  // NaN: unwritten outputs show
  cudaMemset(o_dev, 0xff, kRows * kDim * sizeof(float));
  const int smem = kPanelAlign + 3 * kTileBytes + 16;
  cudaFuncSetAttribute(wgmma_tile_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  wgmma_tile_kernel<<<1, kThreads, smem>>>(maps, s_dev, o_dev);
  const cudaError_t error = cudaDeviceSynchronize();
  if (error != cudaSuccess) {
    std::printf("FAIL: kernel: %s\n", cudaGetErrorString(error));
    return 1;
  }
  std::vector<float> s(kRows * kRows), o(kRows * kDim);
  cudaMemcpy(s.data(), s_dev, s.size() * sizeof(float), cudaMemcpyDeviceToHost);
  cudaMemcpy(o.data(), o_dev, o.size() * sizeof(float), cudaMemcpyDeviceToHost);

  // Reference: S = Q K^T exactly (from the bf16 inputs), P = bf16(S as the GPU computed it),
  // so that O checks P V alone.
  const auto at = [&](int m, int r, int c) {
    return double(__bfloat162float(host[m][r * kDim + c]));
  };
  std::vector<double> s_ref(kRows * kRows, 0.0), o_ref(kRows * kDim, 0.0);
  for (int i = 0; i < kRows; ++i)
    for (int j = 0; j < kRows; ++j)
      for (int c = 0; c < kDim; ++c) s_ref[i * kRows + j] += at(0, i, c) * at(1, j, c);
  for (int i = 0; i < kRows; ++i)
    for (int j = 0; j < kRows; ++j)
      for (int c = 0; c < kDim; ++c)
        o_ref[i * kDim + c] += double(bf16_round(s[i * kRows + j])) * at(2, j, c);
  const double s_err = max_rel_error(s, s_ref), o_err = max_rel_error(o, o_ref);
  std::printf("S = Q K^T: max error %.2e of max |S|; O = P V: %.2e of max |O|\n", s_err, o_err);
  const bool ok = s_err < 1e-5 && o_err < 1e-5;  // float32 accumulation of exact products
  std::printf(ok ? "ok\n" : "FAIL\n");
  return ok ? 0 : 1;
}
