// One tile of the Hopper prefill kernel's arithmetic against a float reference on the host,
// in the kernel's own shapes: 64 query rows (one consumer warpgroup), 128 keys, head_dim 64
// and 128. TMA loads (128-byte swizzle, 64-column panels) into an mbarrier, with the maps of
// the kernel's ranks (Q 4D, K 3D, V 2D), and K shorter than its box so that the rows past its
// end come back as zeros (the kernel's last chunk tile relies on it, and on the mbarrier
// counting the whole box). Then S = Q K^T by wgmma m64n128k16 with both operands in shared
// memory (K-major descriptors), and O = P V with P = S rounded to bf16 taken from registers
// and V as an MN-major (transposed) operand (m64nDk16). It checks csrc/cuda/hopper.cuh's
// descriptors, swizzle and fragment layouts in a second of GPU time, before any kernel built
// on them is trusted. Skipped (exit code 77) without a Hopper GPU.
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

constexpr int kRows = 64;    // queries: one warpgroup
constexpr int kKeys = 128;   // keys of a tile (the box); the K tensor holds kValidKeys of them
constexpr int kValidKeys = 100;
constexpr int kThreads = 128;

struct Maps {
  CUtensorMap q, k, v;
};

template <int D> struct Tile {
  static constexpr int kQBytes = kRows * D * 2, kKBytes = kKeys * D * 2;
  static constexpr int kSmem = kPanelAlign + kQBytes + 2 * kKBytes + 16;
};

template <int D>
__global__ void __launch_bounds__(kThreads) wgmma_tile_kernel(const __grid_constant__ Maps maps,
                                                              float* s_out, float* o_out) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using namespace lminf::cuda::sm90;
  using Tl = Tile<D>;
  constexpr int kPanels = D / kPanelElems;
  // The swizzle atoms need 1024-byte aligned panels; the launch adds that much slack.
  extern __shared__ unsigned char smem_raw[];
  unsigned char* const smem = smem_raw + (kPanelAlign - smem_addr(smem_raw) % kPanelAlign) % kPanelAlign;
  unsigned char* const q = smem;
  unsigned char* const k = q + Tl::kQBytes;
  unsigned char* const v = k + Tl::kKBytes;
  auto* const bar = reinterpret_cast<uint64_t*>(v + Tl::kKBytes);
  if (threadIdx.x == 0) {
    mbarrier_init(bar, 1);
    fence_barrier_init();
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    mbarrier_arrive_expect_tx(bar, Tl::kQBytes + 2 * Tl::kKBytes);  // whole boxes, zeros included
    for (int panel = 0; panel < kPanels; ++panel) {
      tma_load_4d(q + panel * kRows * 128, &maps.q, panel * kPanelElems, 0, 0, 0, bar);
      tma_load_3d(k + panel * kKeys * 128, &maps.k, panel * kPanelElems, 0, 0, bar);
      tma_load_2d(v + panel * kKeys * 128, &maps.v, panel * kPanelElems, 0, bar);
    }
  }
  mbarrier_wait(bar, 0);

  float s[16][4];
  fence_operands(s);
  wgmma_fence();
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks)
    Wgmma<T, 128>::ss(s, desc_k_major(q, kRows, ks), desc_k_major(k, kKeys, ks), ks > 0);
  wgmma_commit();
  wgmma_wait<0>();
  fence_operands(s);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row = 16 * warp + lane / 4, col = 2 * (lane % 4);
  for (int i = 0; i < 16; ++i)
    for (int e = 0; e < 4; ++e) s_out[(row + 8 * (e / 2)) * kKeys + 8 * i + col + e % 2] = s[i][e];

  // P as the A operand from registers: k16 step kk is n8 blocks 2kk and 2kk + 1.
  uint32_t p[kKeys / 16][4];
  for (int kk = 0; kk < kKeys / 16; ++kk)
    for (int r = 0; r < 4; ++r) {
      const float* pair = &s[2 * kk + r / 2][2 * (r % 2)];
      const __nv_bfloat162 packed = __floats2bfloat162_rn(pair[0], pair[1]);
      p[kk][r] = *reinterpret_cast<const uint32_t*>(&packed);
    }
  float o[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[i][e] = 0.f;
  fence_operands(o);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < kKeys / 16; ++kk) Wgmma<T, D>::rs(o, p[kk], desc_mn_major(v, kKeys, kk), 1);
  wgmma_commit();
  wgmma_wait<0>();
  fence_operands(o);
  for (int i = 0; i < D / 8; ++i)
    for (int e = 0; e < 4; ++e) o_out[(row + 8 * (e / 2)) * D + 8 * i + col + e % 2] = o[i][e];
#endif
}

float bf16_round(float x) { return __bfloat162float(__float2bfloat16_rn(x)); }

double max_rel_error(const std::vector<float>& got, const std::vector<double>& want) {
  double err = 0, scale = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    err = std::fmax(err, std::fabs(got[i] - want[i]));  // NaN (unwritten) fails below
    if (std::isnan(got[i])) return INFINITY;
    scale = std::fmax(scale, std::fabs(want[i]));
  }
  return err / scale;
}

// One head_dim: 0 when both products match the host.
template <int D> int check(std::mt19937& rng) {
  using lminf::cuda::sm90::encode_panel_map;
  using lminf::cuda::sm90::encode_panel_map_nd;
  std::uniform_real_distribution<float> uniform(-1.f, 1.f);
  const int rows_of[3] = {kRows, kValidKeys, kKeys};  // Q, K (short: rows past it read zeros), V
  std::vector<T> host[3];
  T* dev[3];
  for (int m = 0; m < 3; ++m) {
    host[m].resize(rows_of[m] * D);
    for (auto& x : host[m]) x = __float2bfloat16_rn(uniform(rng));
    if (cudaMalloc(&dev[m], host[m].size() * sizeof(T)) != cudaSuccess) return 1;
    cudaMemcpy(dev[m], host[m].data(), host[m].size() * sizeof(T), cudaMemcpyHostToDevice);
  }
  Maps maps;
  const uint64_t q_dims[4] = {D, kRows, 1, 1}, q_strides[3] = {D * 2, kRows * D * 2, kRows * D * 2};
  const uint64_t k_dims[3] = {D, kValidKeys, 1}, k_strides[2] = {D * 2, kValidKeys * D * 2};
  if (encode_panel_map_nd(&maps.q, dev[0], true, 4, q_dims, q_strides, kRows) != cudaSuccess ||
      encode_panel_map_nd(&maps.k, dev[1], true, 3, k_dims, k_strides, kKeys) != cudaSuccess ||
      encode_panel_map(&maps.v, dev[2], true, D, kKeys, D, kKeys) != cudaSuccess) {
    std::printf("FAIL: cuTensorMapEncodeTiled (head_dim %d)\n", D);
    return 1;
  }
  float *s_dev, *o_dev;
  cudaMalloc(&s_dev, kRows * kKeys * sizeof(float));
  cudaMalloc(&o_dev, kRows * D * sizeof(float));
  cudaMemset(s_dev, 0xff, kRows * kKeys * sizeof(float));  // NaN: unwritten outputs show
  cudaMemset(o_dev, 0xff, kRows * D * sizeof(float));
  cudaFuncSetAttribute(wgmma_tile_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                       Tile<D>::kSmem);
  wgmma_tile_kernel<D><<<1, kThreads, Tile<D>::kSmem>>>(maps, s_dev, o_dev);
  const cudaError_t error = cudaDeviceSynchronize();
  if (error != cudaSuccess) {
    std::printf("FAIL: kernel (head_dim %d): %s\n", D, cudaGetErrorString(error));
    return 1;
  }
  std::vector<float> s(kRows * kKeys), o(kRows * D);
  cudaMemcpy(s.data(), s_dev, s.size() * sizeof(float), cudaMemcpyDeviceToHost);
  cudaMemcpy(o.data(), o_dev, o.size() * sizeof(float), cudaMemcpyDeviceToHost);
  for (auto* p : dev) cudaFree(p);
  cudaFree(s_dev);
  cudaFree(o_dev);

  // Reference: S = Q K^T exactly (from the bf16 inputs; keys past kValidKeys are zeros), P =
  // bf16(S as the GPU computed it), so that O checks P V alone.
  const auto at = [&](int m, int r, int c) {
    return r < rows_of[m] ? double(__bfloat162float(host[m][r * D + c])) : 0.0;
  };
  std::vector<double> s_ref(kRows * kKeys, 0.0), o_ref(kRows * D, 0.0);
  for (int i = 0; i < kRows; ++i)
    for (int j = 0; j < kKeys; ++j)
      for (int c = 0; c < D; ++c) s_ref[i * kKeys + j] += at(0, i, c) * at(1, j, c);
  for (int i = 0; i < kRows; ++i)
    for (int j = 0; j < kKeys; ++j)
      for (int c = 0; c < D; ++c)
        o_ref[i * D + c] += double(bf16_round(s[i * kKeys + j])) * at(2, j, c);
  const double s_err = max_rel_error(s, s_ref), o_err = max_rel_error(o, o_ref);
  std::printf("head_dim %d: S = Q K^T: max error %.2e of max |S|; O = P V: %.2e of max |O|\n", D,
              s_err, o_err);
  return s_err < 1e-5 && o_err < 1e-5 ? 0 : 1;  // float32 accumulation of exact products
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
  const int failures = check<128>(rng) + check<64>(rng);
  std::printf(failures == 0 ? "ok\n" : "FAIL\n");
  return failures == 0 ? 0 : 1;
}
