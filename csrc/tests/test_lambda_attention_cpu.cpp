// lambda_attention_cpu against the naive float64 loop: whole sequences and chunks over a ring
// cache, odd sizes, GQA and MHA, n_global 0 and > 0, wrap-around, distance_cap != n_local,
// partial rotary, all three dtypes, positions near 10^9, and ragged batches (per-sequence
// starts, strided slot rows, padding, top-k) against each sequence alone.
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "harness.h"
#include "host_tensor.h"
#include "lminf/lambda_attention.h"
#include "lminf/ring_kv_cache.h"
#include "naive_attention.h"

using lminf::DType;
using namespace lminf_test;

namespace {

struct Config {
  int64_t batch, n_heads_q, n_heads_kv, head_dim, rotary_dim;
  int64_t n_global, n_local, distance_cap;
  int64_t n_queries;
  DType dtype = DType::kFloat32;
};

std::string describe(const Config& c) {
  return "batch=" + std::to_string(c.batch) + " heads=" + std::to_string(c.n_heads_q) + "/" +
         std::to_string(c.n_heads_kv) + " head_dim=" + std::to_string(c.head_dim) +
         " rotary_dim=" + std::to_string(c.rotary_dim) + " G=" + std::to_string(c.n_global) +
         " L=" + std::to_string(c.n_local) + " D=" + std::to_string(c.distance_cap) +
         " n_queries=" + std::to_string(c.n_queries) + " dtype=" + lminf::dtype_name(c.dtype);
}

// A chunk of queries with its own keys and values, plus a cache of earlier tokens, in the
// kernel's dtype, and the same data in float64 for the naive loop.
struct Chunk {
  Config config;
  int64_t query_start;
  std::vector<int64_t> cache_positions;  // one per slot, -1 = empty
  std::vector<float> inv_freq;
  HostTensor q, k, v, cache_k, cache_v;

  Chunk(const Config& c, int64_t start, std::vector<int64_t> positions, uint64_t seed)
      : config(c),
        query_start(start),
        cache_positions(std::move(positions)),
        inv_freq(rope_inv_freq(c.rotary_dim)),
        q(c.dtype, random_values(c.batch * c.n_heads_q * c.n_queries * c.head_dim, seed)),
        k(c.dtype, random_values(c.batch * c.n_heads_kv * c.n_queries * c.head_dim, seed + 1)),
        v(c.dtype, random_values(c.batch * c.n_heads_kv * c.n_queries * c.head_dim, seed + 2)),
        cache_k(c.dtype,
                random_values(c.batch * c.n_heads_kv * cache_len() * c.head_dim, seed + 3)),
        cache_v(c.dtype,
                random_values(c.batch * c.n_heads_kv * cache_len() * c.head_dim, seed + 4)) {}

  int64_t cache_len() const { return static_cast<int64_t>(cache_positions.size()); }

  lminf::LambdaAttentionParams params(HostTensor& out) const {
    const Config& c = config;
    const int64_t d = c.head_dim, n = c.n_queries, slots = cache_len();
    lminf::LambdaAttentionParams p;
    p.dtype = c.dtype;
    p.q = lminf::dense_view(q.data(), c.n_heads_q, n, d);
    p.k = lminf::dense_view(k.data(), c.n_heads_kv, n, d);
    p.v = lminf::dense_view(v.data(), c.n_heads_kv, n, d);
    if (slots > 0) {
      p.cache_k = lminf::dense_view(cache_k.data(), c.n_heads_kv, slots, d);
      p.cache_v = lminf::dense_view(cache_v.data(), c.n_heads_kv, slots, d);
      p.cache_positions.data = cache_positions.data();
    }
    p.cache_len = slots;
    p.query_start.data = &query_start;
    p.out = lminf::dense_view(out.data(), c.n_heads_q, n, d);
    p.inv_freq = inv_freq.data();
    p.rotary_dim = c.rotary_dim;
    p.batch = c.batch;
    p.n_heads_q = c.n_heads_q;
    p.n_heads_kv = c.n_heads_kv;
    p.n_queries = n;
    p.head_dim = d;
    p.n_global = c.n_global;
    p.n_local = c.n_local;
    p.distance_cap = c.distance_cap;
    p.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
    return p;
  }

  // The naive loop sees the cache slots and the chunk's tokens as one list of keys.
  std::vector<double> naive() const {
    const Config& c = config;
    NaiveAttentionProblem pr;
    pr.batch = c.batch;
    pr.n_heads_q = c.n_heads_q;
    pr.n_heads_kv = c.n_heads_kv;
    pr.head_dim = c.head_dim;
    pr.rotary_dim = c.rotary_dim;
    pr.n_global = c.n_global;
    pr.n_local = c.n_local;
    pr.distance_cap = c.distance_cap;
    pr.scale = 1.0 / std::sqrt(static_cast<double>(c.head_dim));
    pr.inv_freq = to_double(inv_freq);
    pr.q = q.to_double();
    for (int64_t t = 0; t < c.n_queries; ++t) pr.query_positions.push_back(query_start + t);
    pr.key_positions = cache_positions;
    for (int64_t t = 0; t < c.n_queries; ++t) pr.key_positions.push_back(query_start + t);
    const int64_t n_keys = static_cast<int64_t>(pr.key_positions.size()), d = c.head_dim;
    const std::vector<double> ck = cache_k.to_double(), cv = cache_v.to_double();
    const std::vector<double> nk = k.to_double(), nv = v.to_double();
    pr.k.resize(c.batch * c.n_heads_kv * n_keys * d);
    pr.v.resize(pr.k.size());
    for (int64_t bh = 0; bh < c.batch * c.n_heads_kv; ++bh) {
      for (int64_t j = 0; j < n_keys; ++j) {
        const bool cached = j < cache_len();
        const std::vector<double>& keys = cached ? ck : nk;
        const std::vector<double>& values = cached ? cv : nv;
        const int64_t rows = cached ? cache_len() : c.n_queries;
        const int64_t row = cached ? j : j - cache_len();
        for (int64_t f = 0; f < d; ++f) {
          pr.k[(bh * n_keys + j) * d + f] = keys[(bh * rows + row) * d + f];
          pr.v[(bh * n_keys + j) * d + f] = values[(bh * rows + row) * d + f];
        }
      }
    }
    return naive_lambda_attention(pr);
  }

  std::vector<double> run(int n_threads = 0) const {
    HostTensor out(config.dtype, q.size());
    CHECK_OK(lminf::lambda_attention_cpu(params(out), n_threads)) << describe(config);
    return out.to_double();
  }
};

// The slot positions of a ring cache that has seen the tokens at positions [0, n_seen).
std::vector<int64_t> ring_positions(const Config& c, int64_t n_seen) {
  std::vector<int64_t> positions(c.n_global + c.n_local, -1);
  for (int64_t p = 0; p < n_seen; ++p) {
    if (p < c.n_global || p >= n_seen - c.n_local)
      positions[lminf::ring_slot(p, c.n_global, c.n_local)] = p;
  }
  return positions;
}

// The slots of a ring cache at a far position: the first n_global tokens and the n_local
// before query_start, wherever the ring has brought them.
std::vector<int64_t> far_ring_positions(const Config& c, int64_t query_start) {
  std::vector<int64_t> positions(c.n_global + c.n_local, -1);
  for (int64_t p = 0; p < c.n_global; ++p) positions[p] = p;
  for (int64_t p = query_start - c.n_local; p < query_start; ++p) {
    positions[lminf::ring_slot(p, c.n_global, c.n_local)] = p;
  }
  return positions;
}

void expect_matches_naive(const Chunk& chunk, const std::string& what) {
  const Tolerance tol = tolerance_for(chunk.config.dtype);
  const double worst = worst_error_ratio(chunk.run(), chunk.naive(), tol.atol, tol.rtol);
  CHECK(worst <= 1.0) << what << " " << describe(chunk.config) << " worst error / tolerance "
                      << worst;
}

const std::vector<Config> kWholeSequenceConfigs = {
    // batch, heads q/kv, head_dim, rotary_dim, G, L, D, n_queries
    {1, 1, 1, 64, 64, 0, 4, 4, 1},          // a single token
    {1, 2, 2, 64, 64, 1, 2, 2, 3},          // MHA, tiny window
    {2, 4, 2, 64, 64, 10, 5, 5, 19},        // GQA, globals outnumber the window
    {1, 4, 2, 64, 64, 0, 7, 3, 19},         // no globals, distance_cap < n_local
    {1, 8, 1, 128, 128, 4, 33, 40, 200},    // MQA, head_dim 128, distance_cap > n_local
    {1, 6, 3, 40, 24, 3, 16, 16, 77},       // partial rotary
    {1, 2, 1, 64, 64, 2, 64, 64, 50},       // n_local >= seq: plain causal attention with RoPE
    {1, 9, 3, 64, 64, 10, 128, 128, 1177},  // SmolLM2's heads
};

}  // namespace

TEST(whole_sequences_match_the_naive_loop) {
  uint64_t seed = 1;
  for (const Config& c : kWholeSequenceConfigs)
    expect_matches_naive(Chunk(c, 0, {}, seed += 10), "whole");
}

TEST(low_precision_whole_sequences_match_the_naive_loop) {
  for (DType dtype : {DType::kBFloat16, DType::kFloat16}) {
    Config c{2, 4, 2, 64, 64, 3, 9, 9, 41};
    c.dtype = dtype;
    expect_matches_naive(Chunk(c, 0, {}, 7), "low precision whole");
  }
}

TEST(chunks_over_a_wrapped_ring_cache_match_the_naive_loop) {
  // n_seen tokens before the chunk: a cache still filling, one just full, one wrapped many times.
  const Config configs[] = {
      {1, 4, 2, 64, 64, 4, 16, 16, 1},  // decode
      {2, 4, 2, 64, 64, 4, 16, 16, 7},  // a chunk shorter than the window
      {1, 3, 3, 32, 32, 0, 8, 5, 21},   // a chunk longer than the window, no globals
      {1, 9, 3, 64, 64, 10, 128, 128, 64},
  };
  uint64_t seed = 100;
  for (const Config& c : configs) {
    for (int64_t n_seen : {int64_t{3}, c.n_global + c.n_local, int64_t{1000}}) {
      expect_matches_naive(Chunk(c, n_seen, ring_positions(c, n_seen), seed += 10),
                           "chunk after " + std::to_string(n_seen) + " tokens");
    }
  }
}

TEST(decode_over_a_long_ring_matches_the_naive_loop) {
  // Rings of over 2048 slots with a few heads: the kernel splits each head's slots over
  // several work items and merges their softmax states. Full and wrapped, partly empty (whole
  // parts of the ring without a key), partial rotary and head_dim not whole vectors.
  const Config configs[] = {
      {1, 4, 2, 64, 64, 4, 3000, 3000, 1},
      {1, 8, 1, 128, 128, 4, 2500, 1000, 2},
      {2, 6, 3, 40, 24, 3, 2100, 2100, 1},
  };
  uint64_t seed = 300;
  for (Config c : configs)
    for (DType dtype : {DType::kFloat32, DType::kBFloat16, DType::kFloat16}) {
      c.dtype = dtype;
      for (int64_t n_seen : {int64_t{700}, int64_t{10007}}) {
        const Chunk chunk(c, n_seen, ring_positions(c, n_seen), seed += 10);
        const Tolerance tol = tolerance_for(dtype);
        const std::vector<double> want = chunk.naive();
        for (int threads : {1, 2, 5}) {
          const double worst = worst_error_ratio(chunk.run(threads), want, tol.atol, tol.rtol);
          CHECK(worst <= 1.0) << "decode after " << n_seen << " tokens, " << threads
                              << " threads, " << describe(c) << ": worst error / tolerance " << worst;
        }
      }
    }
}

TEST(positions_near_1e9_give_the_outputs_of_positions_near_1e3) {
  const Config c{1, 4, 2, 64, 64, 4, 32, 32, 9};
  for (int64_t start : {int64_t{1000}, int64_t{1000000007}}) {
    expect_matches_naive(Chunk(c, start, far_ring_positions(c, start), 5), "far window");
  }
  // Same keys by distance: slot s of the far cache holds the token of the near cache's slot
  // that is at the same distance from the chunk.
  const int64_t near_start = 1000, far_start = 1000000007;
  const Chunk near(c, near_start, far_ring_positions(c, near_start), 5);
  Chunk far(c, far_start, far_ring_positions(c, far_start), 5);
  const int64_t d = c.head_dim, slots = c.n_global + c.n_local;
  for (int64_t distance = 1; distance <= c.n_local; ++distance) {
    const int64_t near_slot = lminf::ring_slot(near_start - distance, c.n_global, c.n_local);
    const int64_t far_slot = lminf::ring_slot(far_start - distance, c.n_global, c.n_local);
    for (int64_t head = 0; head < c.n_heads_kv; ++head) {
      far.cache_k.copy_row(near.cache_k, head * slots + near_slot, head * slots + far_slot, d);
      far.cache_v.copy_row(near.cache_v, head * slots + near_slot, head * slots + far_slot, d);
    }
  }
  const double worst = worst_error_ratio(far.run(), near.run(), 1e-6, 1e-5);
  CHECK(worst <= 1.0) << "10^9 vs 10^3: worst error / tolerance " << worst;
}

TEST(thread_count_does_not_change_the_result) {
  const Config c{1, 4, 2, 64, 64, 4, 16, 16, 33};
  const Chunk chunk(c, 500, ring_positions(c, 500), 9);
  const double worst = worst_error_ratio(chunk.run(1), chunk.run(0), 1e-7, 1e-6);
  CHECK(worst <= 1.0) << "1 thread vs default: worst error / tolerance " << worst;
}

// --- Batches of different lengths (issue #16). ---

namespace {

// A batch whose sequences sit at different positions: per-sequence query starts, slot rows
// (spaced further apart than their length, as a caller's strided buffer may be), padding and
// top-k middle positions, in float32.
struct RaggedBatch {
  static constexpr int64_t kHeadsQ = 4, kHeadsKV = 2, kDim = 16, kRows = 9, kSlots = 12,
                           kSlotStride = 15, kMiddle = 10;
  std::vector<int64_t> starts, padding, cache_positions, middle_positions;
  std::vector<float> inv_freq = rope_inv_freq(kDim);
  std::vector<float> q, k, v, cache_k, cache_v, middle_k, middle_v;
  int64_t batch, n_global = 2, n_local = 6, top_k = 0;

  RaggedBatch(std::vector<int64_t> starts_, std::vector<int64_t> padding_, uint64_t seed)
      : starts(std::move(starts_)), padding(std::move(padding_)),
        batch(static_cast<int64_t>(starts.size())) {
    q = random_values(batch * kHeadsQ * kRows * kDim, seed);
    k = random_values(batch * kHeadsKV * kRows * kDim, seed + 1);
    v = random_values(batch * kHeadsKV * kRows * kDim, seed + 2);
    cache_k = random_values(batch * kHeadsKV * kSlots * kDim, seed + 3);
    cache_v = random_values(batch * kHeadsKV * kSlots * kDim, seed + 4);
    middle_k = random_values(batch * kHeadsKV * kMiddle * kDim, seed + 5);
    middle_v = random_values(batch * kHeadsKV * kMiddle * kDim, seed + 6);
    // Each sequence's ring after starts[b] tokens (rows spaced kSlotStride apart) and a middle store of some of its earlier tokens.
    cache_positions.assign(batch * kSlotStride, 1);  // a global key, were the gap ever read
    middle_positions.assign(batch * kMiddle, -1);
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t slot = 0; slot < kSlots; ++slot) cache_positions[b * kSlotStride + slot] = -1;
      for (int64_t p = 0; p < starts[b]; ++p)
        cache_positions[b * kSlotStride + lminf::ring_slot(p, n_global, kSlots - n_global)] = p;
      for (int64_t m = 0; m < kMiddle && 2 * m + n_global < starts[b]; ++m)
        middle_positions[b * kMiddle + m] = 2 * m + n_global;
    }
  }

  // The whole batch (per_sequence) or sequence b alone, its real rows only (rows from `from`).
  lminf::LambdaAttentionParams params(std::vector<float>& out, int64_t only = -1) const {
    const bool alone = only >= 0;
    const int64_t b0 = alone ? only : 0, from = alone ? padding[only] : 0;
    lminf::LambdaAttentionParams p;
    // Sequence b0's rows from `from` on, each tensor dense over the whole batch.
    const auto rows_of = [&](const float* data, int64_t heads, int64_t rows, int64_t first) {
      lminf::StridedView<const void> view = lminf::dense_view(data, heads, rows, kDim);
      view.data = data + view.offset(b0, 0, first);
      return view;
    };
    p.q = rows_of(q.data(), kHeadsQ, kRows, from);
    p.k = rows_of(k.data(), kHeadsKV, kRows, from);
    p.v = rows_of(v.data(), kHeadsKV, kRows, from);
    p.cache_k = rows_of(cache_k.data(), kHeadsKV, kSlots, 0);
    p.cache_v = rows_of(cache_v.data(), kHeadsKV, kSlots, 0);
    p.cache_positions = {cache_positions.data() + b0 * kSlotStride, alone ? 0 : kSlotStride};
    p.cache_len = kSlots;
    p.query_start = {starts.data() + b0, alone ? 0 : 1};
    p.padding = alone ? nullptr : padding.data();
    p.out = lminf::dense_view(out.data() + (alone ? from * kDim : 0), kHeadsQ, kRows, kDim);
    p.inv_freq = inv_freq.data();
    p.rotary_dim = kDim;
    p.batch = alone ? 1 : batch;
    p.n_heads_q = kHeadsQ;
    p.n_heads_kv = kHeadsKV;
    p.n_queries = kRows - from;
    p.head_dim = kDim;
    p.n_global = n_global;
    p.n_local = n_local;
    p.distance_cap = n_local;
    p.scale = 0.25f;
    return p;
  }

  // The middle store and top-k settings to go with params(out, only).
  lminf::TopKMiddleParams top_k_params(int64_t only = -1) const {
    const bool alone = only >= 0;
    const int64_t b0 = alone ? only : 0, from = alone ? padding[only] : 0;
    lminf::TopKMiddleParams m;
    const auto store = [&](const float* data) {
      lminf::StridedView<const void> view = lminf::dense_view(data, kHeadsKV, kMiddle, kDim);
      view.data = data + view.offset(b0, 0, 0);
      return view;
    };
    m.middle_k = store(middle_k.data());
    m.middle_v = store(middle_v.data());
    m.middle_positions = {middle_positions.data() + b0 * kMiddle, alone ? 0 : kMiddle};
    m.middle_len = kMiddle;
    m.top_k = top_k;
    m.top_k_distance = 3;
    m.top_k_first_row = alone ? std::max<int64_t>(0, 4 - from) : 4;  // counts padding rows
    return m;
  }
};

}  // namespace

TEST(a_ragged_batch_gives_each_sequence_its_result_alone) {
  using B = RaggedBatch;
  for (int64_t top_k : {0, 2}) {
    // Starts below and beyond the window, one sequence all padding.
    B batch({0, 3, 40, 17}, {2, 0, 5, 9}, 11 + top_k);
    batch.top_k = top_k;
    std::vector<float> out(batch.batch * B::kHeadsQ * B::kRows * B::kDim, std::nanf(""));
    CHECK_OK(lminf::lambda_attention_top_k_cpu(batch.params(out), batch.top_k_params()));
    for (int64_t b = 0; b < batch.batch; ++b) {
      // Alone: a batch of one, shared layout, only the real rows; written into its own buffer.
      std::vector<float> alone(B::kHeadsQ * B::kRows * B::kDim, 0.f);
      if (batch.padding[b] < B::kRows) {
        CHECK_OK(lminf::lambda_attention_top_k_cpu(batch.params(alone, b), batch.top_k_params(b)));
      }
      std::vector<double> got, want;
      for (int64_t i = 0; i < B::kHeadsQ * B::kRows * B::kDim; ++i) {
        got.push_back(out[b * B::kHeadsQ * B::kRows * B::kDim + i]);
        want.push_back(alone[i]);  // padding rows stay zeros
      }
      const double worst = worst_error_ratio(got, want, 1e-6, 1e-5);
      CHECK(worst <= 1.0) << "top_k " << top_k << " sequence " << b << ": worst error / tolerance "
                          << worst;
    }
  }
}
