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
  std::vector<int64_t> slot_positions(shape.batch * slots, 1234);
  std::vector<int64_t> next_positions(shape.batch, 1234);
  const lminf::KVCacheStorage storage{keys.data(), values.data(), slot_positions.data(),
                                      next_positions.data()};
  KVCache cache;
  CHECK_OK(KVCache::wrap(shape, lminf::MemoryKind::kHost, storage, &cache));
  CHECK(!cache.owns_storage());
  CHECK(next_positions == std::vector<int64_t>(shape.batch, 0) &&
        slot_positions == std::vector<int64_t>(shape.batch * slots, -1))
      << "wrap empties the cache";
  const int64_t& next_position = next_positions[0];  // a uniform batch keeps row 0

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
  CHECK(storage == 2 * KVCache::slot_bytes(shape) + KVCache::position_bytes(shape) +
                       2 * shape.batch * sizeof(int64_t));
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

// --- Sequences of different lengths in one batch (issue #16). ---

namespace {

// One sequence of a ragged batch: its own length and q, k, v ([heads, length, head_dim]).
struct Sequence {
  int64_t length;
  std::vector<float> q, k, v;
};

// Streams `sequences` side by side through `cache` (float32): each step takes the next `chunk`
// tokens of every sequence, left-padded with garbage to the longest piece (a sequence with
// none left is all padding). Returns each sequence's outputs, [heads_q, length, head_dim].
std::vector<std::vector<float>> stream_ragged(KVCache& cache, const lminf::AttentionConfig& attention,
                                              const std::vector<Sequence>& sequences,
                                              int64_t chunk) {
  const lminf::KVCacheShape& shape = cache.shape();
  const int64_t d = shape.head_dim, hq = attention.n_heads_q, hkv = shape.n_heads_kv;
  const int64_t batch = shape.batch;
  std::vector<std::vector<float>> outs(batch);
  std::vector<int64_t> fed(batch, 0);
  for (uint64_t step = 0;; ++step) {
    std::vector<int64_t> take(batch);
    int64_t width = 0;
    for (int64_t b = 0; b < batch; ++b) {
      take[b] = std::min(chunk, sequences[b].length - fed[b]);
      width = std::max(width, take[b]);
    }
    if (width == 0) break;
    std::vector<int64_t> padding(batch);
    for (int64_t b = 0; b < batch; ++b) padding[b] = width - take[b];
    // Garbage far from the data: a padding row read as a key would show.
    std::vector<float> q = random_values(batch * hq * width * d, 100 + step);
    std::vector<float> k = random_values(batch * hkv * width * d, 200 + step);
    std::vector<float> v = random_values(batch * hkv * width * d, 300 + step);
    for (float* x : {q.data(), k.data(), v.data()})
      for (size_t i = 0; i < (x == q.data() ? q.size() : k.size()); ++i) x[i] *= 1000.f;
    auto place = [&](std::vector<float>& dst, const std::vector<float>& src, int64_t heads,
                     int64_t b) {
      for (int64_t h = 0; h < heads; ++h)
        for (int64_t t = 0; t < take[b]; ++t)
          for (int64_t f = 0; f < d; ++f)
            dst[((b * heads + h) * width + padding[b] + t) * d + f] =
                src[(h * sequences[b].length + fed[b] + t) * d + f];
    };
    for (int64_t b = 0; b < batch; ++b) {
      place(q, sequences[b].q, hq, b);
      place(k, sequences[b].k, hkv, b);
      place(v, sequences[b].v, hkv, b);
    }
    std::vector<float> out(q.size(), std::nanf(""));
    CHECK_OK(cache.attend_and_append(attention, q.data(), k.data(), v.data(), width, out.data(),
                                     {}, padding.data()));
    for (int64_t b = 0; b < batch; ++b) {
      outs[b].resize(hq * sequences[b].length * d);
      for (int64_t h = 0; h < hq; ++h)
        for (int64_t t = 0; t < width; ++t)
          for (int64_t f = 0; f < d; ++f) {
            const float x = out[((b * hq + h) * width + t) * d + f];
            if (t < padding[b])
              CHECK(x == 0.f) << "sequence " << b << ": padding row " << t << " holds " << x;
            else
              outs[b][(h * sequences[b].length + fed[b] + t - padding[b]) * d + f] = x;
          }
      fed[b] += take[b];
    }
  }
  return outs;
}

std::vector<double> naive_alone(const lminf::KVCacheShape& shape,
                                const lminf::AttentionConfig& attention,
                                const std::vector<float>& inv_freq, const Sequence& s) {
  NaiveAttentionProblem pr;
  pr.n_heads_q = attention.n_heads_q;
  pr.n_heads_kv = shape.n_heads_kv;
  pr.head_dim = shape.head_dim;
  pr.rotary_dim = attention.rotary_dim;
  pr.n_global = shape.n_global;
  pr.n_local = shape.n_local;
  pr.distance_cap = shape.n_local;
  pr.scale = 1.0 / std::sqrt(static_cast<double>(shape.head_dim));
  pr.inv_freq = to_double(inv_freq);
  pr.q = to_double(s.q);
  pr.k = to_double(s.k);
  pr.v = to_double(s.v);
  for (int64_t t = 0; t < s.length; ++t) {
    pr.query_positions.push_back(t);
    pr.key_positions.push_back(t);
  }
  return naive_lambda_attention(pr);
}

std::vector<Sequence> random_sequences(const std::vector<int64_t>& lengths, int64_t heads_q,
                                       int64_t heads_kv, int64_t d) {
  std::vector<Sequence> sequences;
  uint64_t seed = 40;
  for (int64_t n : lengths)
    sequences.push_back({n, random_values(heads_q * n * d, seed++),
                         random_values(heads_kv * n * d, seed++),
                         random_values(heads_kv * n * d, seed++)});
  return sequences;
}

}  // namespace

TEST(a_ragged_batch_streams_each_sequence_as_if_alone) {
  lminf::KVCacheShape shape = small_shape();
  shape.batch = 4;
  // Shorter than the window, beyond it, beyond it twice, and a single token.
  const std::vector<Sequence> sequences =
      random_sequences({5, 40, 29, 1}, 4, shape.n_heads_kv, shape.head_dim);
  const std::vector<float> inv_freq = rope_inv_freq(32);
  lminf::AttentionConfig attention;
  attention.n_heads_q = 4;
  attention.inv_freq = inv_freq.data();
  attention.rotary_dim = 32;
  const Tolerance tol = tolerance_for(DType::kFloat32);
  for (int64_t chunk : {1, 7, 64}) {
    KVCache cache = allocated(shape);
    const std::vector<std::vector<float>> outs = stream_ragged(cache, attention, sequences, chunk);
    CHECK(!cache.uniform()) << "a ragged append spreads the positions";
    const int64_t slots = shape.n_global + shape.n_local;
    for (int64_t b = 0; b < shape.batch; ++b) {
      const Sequence& s = sequences[b];
      CHECK(cache.n_seen(b) == s.length) << "sequence " << b << " saw " << cache.n_seen(b);
      CHECK(cache.storage().next_position[b] == s.length) << "sequence " << b;
      for (int64_t p = 0; p < s.length; ++p) {
        if (p >= shape.n_global && p < s.length - shape.n_local) continue;
        const int64_t slot = lminf::ring_slot(p, shape.n_global, shape.n_local);
        CHECK(cache.storage().slot_positions[b * slots + slot] == p)
            << "sequence " << b << " slot " << slot;
      }
      const double worst = worst_error_ratio(to_double(outs[b]),
                                             naive_alone(shape, attention, inv_freq, s), tol.atol,
                                             tol.rtol);
      CHECK(worst <= 1.0) << "chunk " << chunk << " sequence " << b << ": worst error / tolerance "
                          << worst;
      // The same sequence streamed alone, in the same chunks.
      lminf::KVCacheShape one = shape;
      one.batch = 1;
      KVCache alone = allocated(one);
      const std::vector<std::vector<float>> alone_out = stream_ragged(alone, attention, {s}, chunk);
      CHECK(worst_error_ratio(to_double(outs[b]), to_double(alone_out[0]), 1e-6, 1e-5) <= 1.0)
          << "chunk " << chunk << " sequence " << b << " differs from the sequence alone";
      CHECK(alone.uniform()) << "a batch of one keeps the shared layout";
    }
  }
}

TEST(a_ragged_batch_after_uniform_steps_keeps_the_shared_history) {
  // Uniform chunks first (the shared layout), then sequences that end at different times.
  lminf::KVCacheShape shape = small_shape();
  shape.batch = 3;
  const std::vector<Sequence> sequences =
      random_sequences({50, 23, 37}, 2, shape.n_heads_kv, shape.head_dim);
  const std::vector<float> inv_freq = rope_inv_freq(32);
  lminf::AttentionConfig attention;
  attention.n_heads_q = 2;
  attention.inv_freq = inv_freq.data();
  attention.rotary_dim = 32;
  KVCache cache = allocated(shape);
  // Chunks of 20 tokens: the first is full for everyone, the second ragged.
  const std::vector<std::vector<float>> outs = stream_ragged(cache, attention, sequences, 20);
  const Tolerance tol = tolerance_for(DType::kFloat32);
  for (int64_t b = 0; b < shape.batch; ++b) {
    const double worst = worst_error_ratio(
        to_double(outs[b]), naive_alone(shape, attention, inv_freq, sequences[b]), tol.atol,
        tol.rtol);
    CHECK(worst <= 1.0) << "sequence " << b << ": worst error / tolerance " << worst;
  }
}

TEST(a_uniform_batch_keeps_the_shared_layout) {
  const Stream stream(small_shape(), 4, 30, 32, 7);
  KVCache cache = allocated(stream.shape);
  stream.run(cache, {7});
  CHECK(cache.uniform());
  // All-zero padding is no padding.
  const std::vector<int64_t> zeros(stream.shape.batch, 0);
  const HostTensor q = stream.q.slice(stream.shape.batch * 4, 30, 0, 1, 32);
  const HostTensor k = stream.k.slice(stream.shape.batch * 2, 30, 0, 1, 32);
  HostTensor out(DType::kFloat32, q.size());
  CHECK_OK(cache.attend_and_append(stream.attention, q.data(), k.data(), k.data(), 1, out.data(),
                                   {}, zeros.data()));
  CHECK(cache.uniform() && cache.n_seen(1) == 31);
}

TEST(bad_padding_is_refused_and_changes_nothing) {
  KVCache cache = allocated(small_shape());
  const std::vector<float> inv_freq = rope_inv_freq(32);
  lminf::AttentionConfig attention;
  attention.n_heads_q = 2;
  attention.inv_freq = inv_freq.data();
  attention.rotary_dim = 32;
  const std::vector<float> q = random_values(2 * 2 * 3 * 32, 8), kv = random_values(2 * 2 * 3 * 32, 9);
  std::vector<float> out(q.size());
  for (const std::vector<int64_t>& padding : {std::vector<int64_t>{0, 4}, {-1, 0}}) {
    const lminf::Status attend =
        cache.attend(attention, q.data(), kv.data(), kv.data(), 3, out.data(), {}, padding.data());
    CHECK(!attend.ok() && attend.message().find("KVCache::attend: padding must be in [0, 3]") !=
                              std::string::npos)
        << attend.message();
    const lminf::Status append = cache.append(kv.data(), kv.data(), 3, {}, padding.data());
    CHECK(!append.ok() && append.message().find("KVCache::append: padding must be in [0, 3]") !=
                              std::string::npos)
        << append.message();
  }
  // A valid ragged chunk with a null value tensor is refused before the layout changes.
  const std::vector<int64_t> ragged{1, 0};
  CHECK(!cache.append(kv.data(), nullptr, 3, {}, ragged.data()).ok());
  CHECK(cache.uniform() && cache.n_seen(0) == 0 && cache.n_seen(1) == 0);
}
