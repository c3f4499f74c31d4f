// lminf::KVCache in CUDA memory against the same stream through a host KVCache (which the other
// tests hold to the naive loop): outputs, and the cache contents, after chunked prefill and
// decoding on a non-default stream, for a uniform batch and a ragged one (left-padded chunks,
// sequences at different positions). Built with -DLMINF_CUDA=ON; skipped (exit code 77) on a
// machine without a GPU.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "harness.h"
#include "host_tensor.h"
#include "lminf/kv_cache.h"

using lminf::DType;
using lminf::KVCache;
using namespace lminf_test;

namespace {

// Device memory freed on scope exit.
class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t bytes) : bytes_(bytes) {
    if (bytes > 0) {
      CHECK(cudaMalloc(&data_, bytes) == cudaSuccess) << bytes << " bytes";
    }
  }
  ~DeviceBuffer() { cudaFree(data_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  void* data() const { return data_; }
  size_t bytes() const { return bytes_; }

 private:
  void* data_ = nullptr;
  size_t bytes_;
};

struct Geometry {
  DType dtype;
  int64_t n_heads_q, n_heads_kv, head_dim;
};

// GPU vs CPU: different summation orders, fast-math exp, and on the tensor-core path the
// softmax weights rounded to the input type before the weighted sum of values.
Tolerance gpu_tolerance(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return {2e-5, 1e-4};
    case DType::kBFloat16:
      return {1.5e-2, 2e-2};
    case DType::kFloat16:
      return {2e-3, 5e-3};
  }
  return {0.0, 0.0};
}

// Leading padding rows of sequence b in chunk i of n tokens: none for a uniform batch; for a
// ragged one, the sequences take turns to pad a prefill chunk or sit out a decode step.
int64_t padding_of(bool ragged, size_t i, int64_t n, int64_t b) {
  if (!ragged) return 0;
  if (n > 1) return (static_cast<int64_t>(i) + b) % 2 == 0 ? n / 3 : 0;
  return i % 5 == 0 && static_cast<int64_t>(i / 5) % 2 == b ? 1 : 0;
}

void stream_on_both(const Geometry& c, bool ragged) {
  lminf::KVCacheShape shape;
  shape.dtype = c.dtype;
  shape.batch = 2;
  shape.n_heads_kv = c.n_heads_kv;
  shape.head_dim = c.head_dim;
  shape.n_global = 4;
  shape.n_local = 64;
  // Prefill chunks shorter and longer than the window, then decoding past several wraps.
  std::vector<int64_t> chunks = {1, 7, 64, 130, 3};
  chunks.resize(chunks.size() + 150, 1);
  int64_t n_tokens = 0;
  for (int64_t n : chunks) n_tokens += n;

  const size_t d = c.head_dim, t = n_tokens;
  const size_t q_rows = shape.batch * c.n_heads_q, kv_rows = shape.batch * c.n_heads_kv;
  const HostTensor q(c.dtype, random_values(q_rows * t * d, 1));
  const HostTensor k(c.dtype, random_values(kv_rows * t * d, 2));
  const HostTensor v(c.dtype, random_values(kv_rows * t * d, 3));
  const std::vector<float> inv_freq = rope_inv_freq(c.head_dim);

  KVCache host, device;
  CHECK_OK(KVCache::allocate(shape, lminf::MemoryKind::kHost, &host));
  CHECK_OK(KVCache::allocate(shape, lminf::MemoryKind::kCuda, &device));
  DeviceBuffer device_inv_freq(inv_freq.size() * sizeof(float));
  cudaMemcpy(device_inv_freq.data(), inv_freq.data(), device_inv_freq.bytes(),
             cudaMemcpyHostToDevice);

  lminf::AttentionConfig host_attention;
  host_attention.n_heads_q = c.n_heads_q;
  host_attention.inv_freq = inv_freq.data();
  host_attention.rotary_dim = c.head_dim;
  lminf::AttentionConfig device_attention = host_attention;
  device_attention.inv_freq = static_cast<const float*>(device_inv_freq.data());

  size_t workspace_bytes = 0;
  for (int64_t n : chunks) {
    workspace_bytes =
        std::max(workspace_bytes, device.attention_workspace_bytes(device_attention, n));
  }
  DeviceBuffer workspace(workspace_bytes);
  cudaStream_t stream;
  CHECK(cudaStreamCreate(&stream) == cudaSuccess);
  const lminf::Launch launch{0, stream, workspace.data(), workspace.bytes()};

  const size_t max_chunk = *std::max_element(chunks.begin(), chunks.end());
  const size_t element = lminf::dtype_size(c.dtype);
  DeviceBuffer dq(q_rows * max_chunk * d * element), dk(kv_rows * max_chunk * d * element);
  DeviceBuffer dv(dk.bytes()), dout(dq.bytes());

  HostTensor host_out(c.dtype, q.size()), device_out(c.dtype, q.size());
  size_t begin = 0;
  std::vector<int64_t> seen(shape.batch, 0);
  for (size_t i = 0; i < chunks.size(); ++i) {
    const int64_t n = chunks[i];
    std::vector<int64_t> padding(shape.batch);
    for (int64_t b = 0; b < shape.batch; ++b) {
      padding[b] = padding_of(ragged, i, n, b);
      seen[b] += n - padding[b];
    }
    const HostTensor cq = q.slice(q_rows, t, begin, n, d), ck = k.slice(kv_rows, t, begin, n, d);
    const HostTensor cv = v.slice(kv_rows, t, begin, n, d);
    HostTensor chunk_out(c.dtype, cq.size()), chunk_device_out(c.dtype, cq.size());
    CHECK_OK(host.attend_and_append(host_attention, cq.data(), ck.data(), cv.data(), n,
                                    chunk_out.data(), {}, padding.data()));
    cudaMemcpyAsync(dq.data(), cq.data(), cq.size() * element, cudaMemcpyHostToDevice, stream);
    cudaMemcpyAsync(dk.data(), ck.data(), ck.size() * element, cudaMemcpyHostToDevice, stream);
    cudaMemcpyAsync(dv.data(), cv.data(), cv.size() * element, cudaMemcpyHostToDevice, stream);
    CHECK_OK(device.attend_and_append(device_attention, dq.data(), dk.data(), dv.data(), n,
                                      dout.data(), launch, padding.data()));
    cudaMemcpyAsync(chunk_device_out.data(), dout.data(), cq.size() * element,
                    cudaMemcpyDeviceToHost, stream);
    CHECK(cudaStreamSynchronize(stream) == cudaSuccess) << cudaGetErrorString(cudaGetLastError());
    host_out.assign_slice(chunk_out, q_rows, t, begin, n, d);
    device_out.assign_slice(chunk_device_out, q_rows, t, begin, n, d);
    begin += n;
  }

  const Tolerance tol = gpu_tolerance(c.dtype);
  const double worst =
      worst_error_ratio(device_out.to_double(), host_out.to_double(), tol.atol, tol.rtol);
  CHECK(worst <= 1.0) << lminf::dtype_name(c.dtype) << " heads " << c.n_heads_q << "/"
                      << c.n_heads_kv << " head_dim " << c.head_dim << ": worst error / tolerance "
                      << worst;

  // The same tokens in the same slots: appending is a copy. A uniform batch keeps row 0 only.
  CHECK(device.uniform() == !ragged && host.uniform() == !ragged);
  const size_t rows = ragged ? shape.batch : 1;
  const size_t slots = (shape.n_global + shape.n_local) * rows;
  std::vector<int64_t> positions(slots), next(rows);
  cudaMemcpy(positions.data(), device.storage().slot_positions, slots * sizeof(int64_t),
             cudaMemcpyDeviceToHost);
  cudaMemcpy(next.data(), device.storage().next_position, rows * sizeof(int64_t),
             cudaMemcpyDeviceToHost);
  for (size_t b = 0; b < rows; ++b)
    CHECK(next[b] == seen[b] && device.n_seen(b) == seen[b] && host.n_seen(b) == seen[b])
        << "sequence " << b << ": " << next[b] << " vs " << seen[b];
  CHECK(std::equal(positions.begin(), positions.end(), host.storage().slot_positions))
      << "slot positions differ";
  std::vector<unsigned char> keys(KVCache::slot_bytes(shape));
  cudaMemcpy(keys.data(), device.storage().keys, keys.size(), cudaMemcpyDeviceToHost);
  CHECK(
      std::equal(keys.begin(), keys.end(), static_cast<const unsigned char*>(host.storage().keys)))
      << "cached keys differ";

  // Too little workspace is an argument error, not a fault.
  if (device.attention_workspace_bytes(device_attention, 1) > 0) {
    const lminf::Launch starved{0, stream, nullptr, 0};
    const lminf::Status status =
        device.decode(device_attention, dq.data(), dk.data(), dv.data(), dout.data(), starved);
    CHECK(status.code() == lminf::StatusCode::kInvalidArgument &&
          status.message().find("workspace") != std::string::npos)
        << status.message();
  }
  cudaStreamDestroy(stream);
}

}  // namespace

TEST(a_cuda_cache_streams_like_a_host_cache) {
  const Geometry geometries[] = {
      {DType::kBFloat16, 9, 3, 64},  // SmolLM2's attention, tensor cores
      {DType::kFloat16, 8, 1, 128},  // MQA, head_dim 128, tensor cores
      {DType::kFloat32, 4, 2, 64},   // the generic kernel
  };
  for (const Geometry& g : geometries) stream_on_both(g, /*ragged=*/false);
}

TEST(a_ragged_batch_on_a_cuda_cache_streams_like_a_host_cache) {
  const Geometry geometries[] = {
      {DType::kBFloat16, 9, 3, 64},
      {DType::kFloat32, 4, 2, 64},
  };
  for (const Geometry& g : geometries) stream_on_both(g, /*ragged=*/true);
}

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("no CUDA device: skipped\n");
    return 77;
  }
  return run_all();
}
