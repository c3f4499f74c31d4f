// lminf::KVCache on the host: a stream fed in chunks of any size matches the naive loop over
// the whole history at every token, caller-owned storage ends up in the documented layout,
// reset starts afresh, and memory stays constant over a long stream.
#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "harness.h"
#include "heap_usage.h"
#include "host_tensor.h"
#include "lminf/kv_cache.h"
#include "lminf/ring_kv_cache.h"
#include "naive_attention.h"

using lminf::DType;
using lminf::KVCache;
using namespace lminf_test;

namespace {

// A synthetic stream for one layer: q, k, v of n_tokens tokens, [batch, heads, n_tokens, d].
struct Stream {
  lminf::KVCacheShape shape;
  int64_t n_heads_q, n_tokens;
  std::vector<float> inv_freq;
  lminf::AttentionConfig attention;
  HostTensor q, k, v;

  Stream(const lminf::KVCacheShape& s, int64_t heads_q, int64_t tokens, int64_t rotary_dim,
         uint64_t seed)
      : shape(s),
        n_heads_q(heads_q),
        n_tokens(tokens),
        inv_freq(rope_inv_freq(rotary_dim)),
        q(s.dtype, random_values(s.batch * heads_q * tokens * s.head_dim, seed)),
        k(s.dtype, random_values(s.batch * s.n_heads_kv * tokens * s.head_dim, seed + 1)),
        v(s.dtype, random_values(s.batch * s.n_heads_kv * tokens * s.head_dim, seed + 2)) {
    attention.n_heads_q = heads_q;
    attention.inv_freq = inv_freq.data();
    attention.rotary_dim = rotary_dim;
  }

  // Feeds the stream through `cache` in chunks of the given sizes (cycled), decoding where a
  // chunk has one token, and returns every output, [batch, n_heads_q, n_tokens, head_dim].
  std::vector<double> run(KVCache& cache, const std::vector<int64_t>& chunk_sizes) const {
    const size_t d = shape.head_dim, t = n_tokens;
    const size_t q_rows = shape.batch * n_heads_q, kv_rows = shape.batch * shape.n_heads_kv;
    HostTensor out(shape.dtype, q.size());
    size_t begin = 0;
    for (size_t i = 0; begin < t; ++i) {
      const size_t n = std::min<size_t>(chunk_sizes[i % chunk_sizes.size()], t - begin);
      const HostTensor cq = q.slice(q_rows, t, begin, n, d);
      const HostTensor ck = k.slice(kv_rows, t, begin, n, d);
      const HostTensor cv = v.slice(kv_rows, t, begin, n, d);
      HostTensor chunk_out(shape.dtype, cq.size());
      const lminf::Status status =
          n == 1 ? cache.decode(attention, cq.data(), ck.data(), cv.data(), chunk_out.data())
                 : cache.attend_and_append(attention, cq.data(), ck.data(), cv.data(),
                                           static_cast<int64_t>(n), chunk_out.data());
      CHECK(status.ok()) << "chunk at " << begin << ": " << status.message();
      out.assign_slice(chunk_out, q_rows, t, begin, n, d);
      begin += n;
    }
    CHECK(cache.n_seen() == n_tokens) << cache.n_seen();
    return out.to_double();
  }

  std::vector<double> naive() const {
    NaiveAttentionProblem pr;
    pr.batch = shape.batch;
    pr.n_heads_q = n_heads_q;
    pr.n_heads_kv = shape.n_heads_kv;
    pr.head_dim = shape.head_dim;
    pr.rotary_dim = attention.rotary_dim;
    pr.n_global = shape.n_global;
    pr.n_local = shape.n_local;
    pr.distance_cap = attention.distance_cap.value_or(shape.n_local);
    pr.scale = attention.scale.value_or(1.0f / std::sqrt(static_cast<float>(shape.head_dim)));
    pr.inv_freq = to_double(inv_freq);
    pr.q = q.to_double();
    pr.k = k.to_double();
    pr.v = v.to_double();
    for (int64_t t = 0; t < n_tokens; ++t) {
      pr.query_positions.push_back(t);
      pr.key_positions.push_back(t);
    }
    return naive_lambda_attention(pr);
  }
};

lminf::KVCacheShape small_shape(DType dtype = DType::kFloat32) {
  lminf::KVCacheShape shape;
  shape.dtype = dtype;
  shape.batch = 2;
  shape.n_heads_kv = 2;
  shape.head_dim = 32;
  shape.n_global = 3;
  shape.n_local = 16;
  return shape;
}

KVCache allocated(const lminf::KVCacheShape& shape) {
  KVCache cache;
  CHECK_OK(KVCache::allocate(shape, lminf::MemoryKind::kHost, &cache));
  return cache;
}

}  // namespace

TEST(a_stream_matches_the_naive_loop_for_any_chunking) {
  for (DType dtype : {DType::kFloat32, DType::kBFloat16, DType::kFloat16}) {
    const Stream stream(small_shape(dtype), 4, 101, 32, 1);
    const std::vector<double> want = stream.naive();
    const Tolerance tol = tolerance_for(dtype);
    for (const std::vector<int64_t>& chunks :
         {std::vector<int64_t>{101}, {1}, {7}, {16, 17, 1, 3}, {40, 1, 1, 19}}) {
      KVCache cache = allocated(stream.shape);
      const double worst = worst_error_ratio(stream.run(cache, chunks), want, tol.atol, tol.rtol);
      CHECK(worst <= 1.0) << lminf::dtype_name(dtype) << " first chunk " << chunks[0]
                          << ": worst error / tolerance " << worst;
    }
  }
}

TEST(chunked_and_whole_streams_agree_to_float_rounding) {
  const Stream stream(small_shape(), 4, 64, 32, 2);
  KVCache whole = allocated(stream.shape), by_token = allocated(stream.shape);
  const double worst =
      worst_error_ratio(stream.run(by_token, {1}), stream.run(whole, {64}), 1e-6, 1e-5);
  CHECK(worst <= 1.0) << "token by token vs whole: worst error / tolerance " << worst;
}

TEST(distance_cap_and_scale_are_passed_through) {
  Stream stream(small_shape(), 2, 40, 16, 3);  // also partial rotary: 16 of 32 features
  stream.attention.distance_cap = 5;
  stream.attention.scale = 0.3f;
  KVCache cache = allocated(stream.shape);
  const Tolerance tol = tolerance_for(DType::kFloat32);
  const double worst =
      worst_error_ratio(stream.run(cache, {9}), stream.naive(), tol.atol, tol.rtol);
  CHECK(worst <= 1.0) << "worst error / tolerance " << worst;
}

TEST(caller_storage_holds_the_documented_ring_layout) {
  const lminf::KVCacheShape shape = small_shape();
  const int64_t slots = shape.n_global + shape.n_local, d = shape.head_dim;
  std::vector<float> keys(KVCache::slot_bytes(shape) / sizeof(float));
  std::vector<float> values(keys.size());
  std::vector<int64_t> slot_positions(slots, 1234);
  int64_t next_position = 1234;
  const lminf::KVCacheStorage storage{keys.data(), values.data(), slot_positions.data(),
                                      &next_position};
  KVCache cache;
  CHECK_OK(KVCache::wrap(shape, lminf::MemoryKind::kHost, storage, &cache));
  CHECK(!cache.owns_storage());
  CHECK(next_position == 0 && slot_positions[0] == -1) << "wrap empties the cache";

  const int64_t n_tokens = 45;  // wraps the window of 16 twice
  const Stream stream(shape, 2, n_tokens, 32, 4);
  stream.run(cache, {5, 1, 11});
  CHECK(next_position == n_tokens) << next_position;
  const std::vector<double> k = stream.k.to_double(), v = stream.v.to_double();
  for (int64_t p = 0; p < n_tokens; ++p) {
    const bool kept = p < shape.n_global || p >= n_tokens - shape.n_local;
    if (!kept) continue;
    const int64_t slot = lminf::ring_slot(p, shape.n_global, shape.n_local);
    CHECK(slot_positions[slot] == p) << "slot " << slot << " holds " << slot_positions[slot];
    for (int64_t bh = 0; bh < shape.batch * shape.n_heads_kv; ++bh) {
      for (int64_t f = 0; f < d; ++f) {
        const size_t stored = (bh * slots + slot) * d + f, fed = (bh * n_tokens + p) * d + f;
        CHECK(keys[stored] == k[fed] && values[stored] == v[fed]) << "position " << p;
      }
    }
  }
}

TEST(reset_starts_a_new_stream) {
  const Stream stream(small_shape(), 4, 50, 32, 5);
  KVCache cache = allocated(stream.shape);
  const std::vector<double> first = stream.run(cache, {13});
  CHECK_OK(cache.reset());
  CHECK(cache.n_seen() == 0);
  const std::vector<double> second = stream.run(cache, {13});
  CHECK(second == first) << "after reset the same stream gives different outputs";
}

TEST(moving_a_cache_moves_its_storage) {
  KVCache source = allocated(small_shape());
  const void* keys = source.storage().keys;
  KVCache target = std::move(source);
  CHECK(target.storage().keys == keys && target.owns_storage());
  CHECK(source.storage().keys == nullptr && !source.reset().ok()) << "a moved-from cache is empty";
}

TEST(memory_stays_constant_over_a_long_stream) {
  const lminf::KVCacheShape shape = small_shape();
  const int64_t n_tokens = 20000, chunk = 100;
  const Stream stream(shape, 4, chunk, 32, 6);
  KVCache cache = allocated(shape);
  const size_t storage = cache.storage_bytes();
  CHECK(storage ==
        2 * KVCache::slot_bytes(shape) + KVCache::position_bytes(shape) + sizeof(int64_t));
  HostTensor out(shape.dtype, stream.q.size());
  // The first two chunks warm up what is allocated once: OpenMP's thread pool, and 208 bytes
  // more on the second call whenever 2 or more threads run (none with OMP_NUM_THREADS=1; not
  // traced further). Every chunk after them must leave the heap exactly as it found it.
  constexpr int64_t kWarmUpChunks = 2;
  for (int64_t c = 0; c < kWarmUpChunks; ++c)
    CHECK_OK(cache.attend_and_append(stream.attention, stream.q.data(), stream.k.data(),
                                     stream.v.data(), chunk, out.data()));
  const size_t heap_after_warm_up = heap_bytes_in_use();
  for (int64_t fed = kWarmUpChunks * chunk; fed < n_tokens; fed += chunk) {
    CHECK_OK(cache.attend_and_append(stream.attention, stream.q.data(), stream.k.data(),
                                     stream.v.data(), chunk, out.data()));
  }
  CHECK(cache.n_seen() == n_tokens);
  CHECK(cache.storage_bytes() == storage);
  CHECK(heap_bytes_in_use() == heap_after_warm_up)
      << heap_after_warm_up << " bytes in use after the first chunk, " << heap_bytes_in_use()
      << " after " << n_tokens << " tokens";
}
