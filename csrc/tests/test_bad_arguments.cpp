// Bad arguments give an error Status whose message names the argument, and change nothing:
// outputs stay poisoned, caches keep their position.
#include <cstdint>
#include <functional>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "harness.h"
#include "host_tensor.h"
#include "lminf/lminf.h"

using lminf::DType;
using lminf::KVCache;
using lminf::Status;
using lminf::StatusCode;
using namespace lminf_test;

namespace {

void expect_error(const Status& status, StatusCode code, const std::string& names,
                  const std::string& what) {
  CHECK(status.code() == code) << what << ": code " << static_cast<int>(status.code())
                               << ", message '" << status.message() << "'";
  CHECK(status.message().find(names) != std::string::npos)
      << what << ": message '" << status.message() << "' does not name " << names;
}

bool all_nan(const HostTensor& tensor) {
  for (double x : tensor.to_double()) {
    if (x == x) return false;
  }
  return true;
}

// A valid problem for the low-level kernel: 2 query heads over 1 kv head, 5 tokens, no cache.
struct ValidAttention {
  static constexpr int64_t kHeadDim = 8, kTokens = 5;
  std::vector<float> inv_freq = rope_inv_freq(kHeadDim);
  HostTensor q{DType::kFloat32, random_values(2 * kTokens * kHeadDim, 1)};
  HostTensor kv{DType::kFloat32, random_values(kTokens * kHeadDim, 2)};
  HostTensor out{DType::kFloat32, 2 * kTokens * kHeadDim};
  int64_t query_start = 0;
  std::optional<int64_t> padding;  // leading padding rows of the one sequence, if any
  bool per_sequence = false;       // query_start as a [batch] array (stride 1)
  std::vector<int64_t> cache_positions = std::vector<int64_t>(4, -1);

  lminf::LambdaAttentionParams params() {
    lminf::LambdaAttentionParams p;
    p.q = lminf::dense_view(q.data(), 2, kTokens, kHeadDim);
    p.k = p.v = lminf::dense_view(kv.data(), 1, kTokens, kHeadDim);
    p.out = lminf::dense_view(out.data(), 2, kTokens, kHeadDim);
    p.query_start = {&query_start, per_sequence ? 1 : 0};
    p.padding = padding ? &*padding : nullptr;
    p.inv_freq = inv_freq.data();
    p.rotary_dim = kHeadDim;
    p.batch = 1;
    p.n_heads_q = 2;
    p.n_heads_kv = 1;
    p.n_queries = kTokens;
    p.head_dim = kHeadDim;
    p.n_global = 1;
    p.n_local = 3;
    p.distance_cap = 3;
    p.scale = 0.5f;
    return p;
  }
};

lminf::KVCacheShape valid_shape() {
  lminf::KVCacheShape shape;
  shape.n_heads_kv = 1;
  shape.head_dim = 8;
  shape.n_global = 1;
  shape.n_local = 3;
  return shape;
}

}  // namespace

TEST(lambda_attention_cpu_names_the_bad_field) {
  using Params = lminf::LambdaAttentionParams;
  const std::vector<std::pair<std::string, std::function<void(Params&)>>> cases = {
      {"dtype", [](Params& p) { p.dtype = static_cast<DType>(7); }},
      {"n_heads_q",
       [](Params& p) {
         p.n_heads_q = 3;
         p.n_heads_kv = 2;
       }},
      {"n_heads_kv", [](Params& p) { p.n_heads_kv = 0; }},
      {"head_dim", [](Params& p) { p.head_dim = 0; }},
      {"n_local", [](Params& p) { p.n_local = 0; }},
      {"n_global", [](Params& p) { p.n_global = -1; }},
      {"distance_cap", [](Params& p) { p.distance_cap = -2; }},
      {"rotary_dim", [](Params& p) { p.rotary_dim = 5; }},
      {"rotary_dim", [](Params& p) { p.rotary_dim = 10; }},
      {"inv_freq", [](Params& p) { p.inv_freq = nullptr; }},
      {"query_start", [](Params& p) { p.query_start.data = nullptr; }},
      {"q", [](Params& p) { p.q.data = nullptr; }},
      {"out", [](Params& p) { p.out.data = nullptr; }},
      {"cache_positions", [](Params& p) { p.cache_len = 4; }},
      {"n_queries", [](Params& p) { p.n_queries = -1; }},
      // Sizes whose sums the kernels form must stay far from int64's end (limits.h).
      {"n_local", [](Params& p) { p.n_local = lminf::kMaxPosition + 1; }},
      {"n_global", [](Params& p) { p.n_global = INT64_MAX; }},
      {"n_global + n_local", [](Params& p) { p.n_global = p.n_local = lminf::kMaxPosition; }},
      {"distance_cap", [](Params& p) { p.distance_cap = INT64_MAX; }},
      {"cache_len", [](Params& p) { p.cache_len = INT64_MAX; }},
      {"scale", [](Params& p) { p.scale = std::numeric_limits<float>::quiet_NaN(); }},
      {"scale", [](Params& p) { p.scale = std::numeric_limits<float>::infinity(); }},
      // Per-sequence layouts (issue #16): a start per sequence or one shared, slot rows that
      // never overlap.
      {"query_start.batch_stride must be 0 (one value shared by the batch) or 1",
       [](Params& p) { p.query_start.batch_stride = 2; }},
      {"query_start.batch_stride", [](Params& p) { p.query_start.batch_stride = -1; }},
      {"cache_positions.batch_stride must be 0 (shared by the batch) or in [4, 2^62]",
       [](Params& p) {
         p.cache_len = 4;
         p.cache_k = p.cache_v = p.q;
         p.cache_positions.batch_stride = 3;
       }},
  };
  for (const auto& [field, corrupt] : cases) {
    ValidAttention valid;
    Params params = valid.params();
    corrupt(params);
    expect_error(lminf::lambda_attention_cpu(params), StatusCode::kInvalidArgument, field, field);
    CHECK(all_nan(valid.out)) << field << ": the output was written";
  }
  ValidAttention valid;
  CHECK_OK(lminf::lambda_attention_cpu(valid.params())) << "the unmodified problem is valid";
}

// The top-k entry point checks its own fields as well as the attention's.
TEST(lambda_attention_top_k_cpu_names_the_bad_field) {
  using TopK = lminf::TopKMiddleParams;
  const std::vector<std::pair<std::string, std::function<void(TopK&, const void*)>>> cases = {
      {"top_k", [](TopK& m, const void*) { m.top_k = INT64_MAX; }},
      {"top_k", [](TopK& m, const void*) { m.top_k = -1; }},
      {"top_k_distance", [](TopK& m, const void*) { m.top_k_distance = -1; }},
      {"top_k_first_row", [](TopK& m, const void*) { m.top_k_first_row = INT64_MAX; }},
      {"middle_k, middle_v and middle_positions must not be null",
       [](TopK& m, const void*) { m.middle_len = 2; }},
      {"middle_positions.batch_stride must be 0 (shared by the batch) or in [2, 2^62]",
       [](TopK& m, const void* q) {
         static const int64_t positions[4] = {};
         m.middle_len = 2;
         m.middle_k = m.middle_v = {q, 0, 0, 0};
         m.middle_positions = {positions, 1};
       }},
  };
  for (const auto& [field, corrupt] : cases) {
    ValidAttention valid;
    const lminf::LambdaAttentionParams params = valid.params();
    TopK top_k;
    top_k.top_k = 1;
    corrupt(top_k, params.q.data);
    expect_error(lminf::lambda_attention_top_k_cpu(params, top_k), StatusCode::kInvalidArgument,
                 field, field);
    CHECK(all_nan(valid.out)) << field << ": the output was written";
  }
  ValidAttention valid;
  TopK top_k;
  top_k.top_k = 1;
  CHECK_OK(lminf::lambda_attention_top_k_cpu(valid.params(), top_k)) << "an empty store is valid";
}

// Values the CPU entry point reads from host memory: positions and frequencies.
TEST(lambda_attention_cpu_checks_the_values_it_reads) {
  const std::vector<std::pair<std::string, std::function<void(ValidAttention&)>>> cases = {
      // A negative start read the rotary table out of bounds; near 2^63 positions wrapped.
      {"query_start must be in [0, 2^62 - 5]", [](ValidAttention& a) { a.query_start = -1; }},
      {"query_start must be in [0, 2^62 - 5]",
       [](ValidAttention& a) { a.query_start = lminf::kMaxPosition - 4; }},
      {"inv_freq must be finite",
       [](ValidAttention& a) { a.inv_freq[1] = std::numeric_limits<float>::quiet_NaN(); }},
      // Padding rows: a count in [0, n_queries]; the real rows' positions in range.
      {"padding must be in [0, 5] (leading padding rows of the chunk), got 6 for sequence 0",
       [](ValidAttention& a) { a.padding = 6; }},
      {"padding must be in [0, 5] (leading padding rows of the chunk), got -1 for sequence 0",
       [](ValidAttention& a) { a.padding = -1; }},
      {"query_start must be in [0, 2^62 - 3]",
       [](ValidAttention& a) {
         a.padding = 2;
         a.query_start = lminf::kMaxPosition - 2;
       }},
      {"query_start must be in [0, 2^62 - 5]", [](ValidAttention& a) {
         a.per_sequence = true;
         a.query_start = -1;
       }},
  };
  for (const auto& [message, corrupt] : cases) {
    ValidAttention valid;
    corrupt(valid);
    expect_error(lminf::lambda_attention_cpu(valid.params()), StatusCode::kInvalidArgument, message,
                 message);
    CHECK(all_nan(valid.out)) << message << ": the output was written";
  }
  ValidAttention last;
  last.query_start = lminf::kMaxPosition - 5;  // the chunk's last position is 2^62 - 1
  CHECK_OK(lminf::lambda_attention_cpu(last.params()));
}

// Windows far larger than the stream cost nothing: plain causal attention, no huge scratch.
TEST(lambda_attention_cpu_huge_window_and_top_k_are_results_not_aborts) {
  ValidAttention huge, plain;
  lminf::LambdaAttentionParams p = huge.params(), reference = plain.params();
  p.n_local = lminf::kMaxPosition - 10;
  p.n_global = 10;
  reference.n_local = ValidAttention::kTokens;
  CHECK_OK(lminf::lambda_attention_cpu(p));
  CHECK_OK(lminf::lambda_attention_cpu(reference));
  CHECK(huge.out.to_double() == plain.out.to_double()) << "n_local = 2^62 is causal attention";

  ValidAttention top_k;
  p = top_k.params();
  p.n_local = 1;
  lminf::TopKMiddleParams middle;
  middle.top_k = lminf::kMaxPosition;  // more than the 5 candidates: all of them
  middle.top_k_distance = 1;
  CHECK_OK(lminf::lambda_attention_top_k_cpu(p, middle));
}

// NaN in a query gives NaN in that row only.
TEST(lambda_attention_cpu_nan_query_gives_a_nan_row) {
  ValidAttention valid;
  static_cast<float*>(valid.q.data())[2 * ValidAttention::kHeadDim] = std::numeric_limits<float>::quiet_NaN();
  CHECK_OK(lminf::lambda_attention_cpu(valid.params()));
  const std::vector<double> out = valid.out.to_double();
  for (int64_t row = 0; row < 2 * ValidAttention::kTokens; ++row) {
    const double x = out[row * ValidAttention::kHeadDim];
    CHECK((x != x) == (row == 2)) << "row " << row << ": " << x;
  }
}

TEST(ring_cache_append_cpu_names_the_bad_field) {
  using Params = lminf::RingCacheAppendParams;
  const std::vector<std::pair<std::string, std::function<void(Params&)>>> cases = {
      {"n_local", [](Params& p) { p.n_local = 0; }},
      {"n_global", [](Params& p) { p.n_global = -1; }},
      {"n_new", [](Params& p) { p.n_new = -1; }},
      {"start_position", [](Params& p) { p.start_position.data = nullptr; }},
      {"cache_positions", [](Params& p) { p.cache_positions.data = nullptr; }},
      {"k", [](Params& p) { p.k.data = nullptr; }},
      {"n_local", [](Params& p) { p.n_local = INT64_MAX; }},
      {"n_global", [](Params& p) { p.n_global = lminf::kMaxPosition + 1; }},
      // Near 2^63 the positions wrapped negative and overwrote the global slots.
      {"start_position must be in [0, 2^62 - 2]",
       [](Params& p) { *const_cast<int64_t*>(p.start_position.data) = INT64_MAX - 1; }},
      {"start_position must be in [0, 2^62 - 2]",
       [](Params& p) { *const_cast<int64_t*>(p.start_position.data) = -1; }},
      {"start_position.batch_stride must be 0 (one value shared by the batch) or 1",
       [](Params& p) { p.start_position.batch_stride = 3; }},
      {"cache_positions.batch_stride must be 0 (shared by the batch) or in [4, 2^62]",
       [](Params& p) { p.cache_positions.batch_stride = 2; }},
      // Two sequences at different positions cannot share one row of slot positions.
      {"cache_positions.batch_stride must be at least n_global + n_local (4, one row of slot "
       "positions per sequence) when start_position is per sequence, got 0",
       [](Params& p) {
         p.batch = 2;
         p.start_position.batch_stride = 1;
       }},
      {"cache_positions.batch_stride must be at least n_global + n_local (4, one row of slot "
       "positions per sequence) when padding is given, got 0",
       [](Params& p) {
         p.batch = 2;
         p.padding = p.start_position.data;  // [0, 0]
       }},
      {"padding must be in [0, 2] (leading padding rows of the chunk), got 3 for sequence 0",
       [](Params& p) { p.padding = p.start_position.data + 2; }},  // holds 3
      {"start_position must be in [0, 2^62 - 1] (the chunk's 1 positions must stay below 2^62), "
       "got 4611686018427387904 for sequence 1",
       [](Params& p) {
         p.batch = 2;
         p.cache_positions.batch_stride = 4;
         p.start_position.batch_stride = 1;
         p.padding = p.start_position.data + 3;  // [1, 1]
       }},
  };
  for (const auto& [field, corrupt] : cases) {
    std::vector<float> cache(4 * 8), chunk = random_values(2 * 8, 3);
    // Two sequences' worth, so that a case can make the batch per-sequence; k's second
    // sequence reads the first's rows (batch stride 0).
    std::vector<int64_t> positions(8, -1);
    // start_position [0, 0] or [0, 2^62], then spare values a case points padding at.
    int64_t start[5] = {0, field.find("for sequence 1") != std::string::npos ? lminf::kMaxPosition : 0,
                        3, 1, 1};
    Params p;
    p.cache_k = p.cache_v = {cache.data(), 0, 32, 8};
    p.cache_positions.data = positions.data();
    p.k = p.v = {chunk.data(), 0, 16, 8};
    p.start_position.data = start;
    p.batch = p.n_heads_kv = 1;
    p.n_new = 2;
    p.head_dim = 8;
    p.n_global = 1;
    p.n_local = 3;
    corrupt(p);
    expect_error(lminf::ring_cache_append_cpu(p), StatusCode::kInvalidArgument, field, field);
    CHECK(positions == std::vector<int64_t>(8, -1)) << field << ": the cache was written";
  }
}

TEST(kv_cache_creation_names_the_bad_field) {
  using Shape = lminf::KVCacheShape;
  const std::vector<std::pair<std::string, std::function<void(Shape&)>>> cases = {
      {"shape.dtype", [](Shape& s) { s.dtype = static_cast<DType>(-1); }},
      {"shape.batch", [](Shape& s) { s.batch = 0; }},
      {"shape.n_heads_kv", [](Shape& s) { s.n_heads_kv = 0; }},
      {"shape.head_dim", [](Shape& s) { s.head_dim = -8; }},
      {"shape.n_global", [](Shape& s) { s.n_global = -1; }},
      {"shape.n_local", [](Shape& s) { s.n_local = 0; }},
      {"overflow", [](Shape& s) { s.n_local = s.head_dim = int64_t{1} << 40; }},
  };
  for (const auto& [field, corrupt] : cases) {
    Shape shape = valid_shape();
    corrupt(shape);
    KVCache cache;
    expect_error(KVCache::allocate(shape, lminf::MemoryKind::kHost, &cache),
                 StatusCode::kInvalidArgument, field, "allocate " + field);
    CHECK(cache.storage().keys == nullptr) << field;
  }
  expect_error(KVCache::allocate(valid_shape(), lminf::MemoryKind::kHost, nullptr),
               StatusCode::kInvalidArgument, "cache", "allocate into null");
  expect_error(KVCache::allocate(valid_shape(), static_cast<lminf::MemoryKind>(9), nullptr),
               StatusCode::kInvalidArgument, "memory", "allocate in unknown memory");

  std::vector<float> buffer(64);
  std::vector<int64_t> positions(4);
  int64_t next = 0;
  const lminf::KVCacheStorage complete{buffer.data(), buffer.data(), positions.data(), &next};
  const std::vector<std::pair<std::string, lminf::KVCacheStorage>> storages = {
      {"storage.keys", {nullptr, buffer.data(), positions.data(), &next}},
      {"storage.values", {buffer.data(), nullptr, positions.data(), &next}},
      {"storage.slot_positions", {buffer.data(), buffer.data(), nullptr, &next}},
      {"storage.next_position", {buffer.data(), buffer.data(), positions.data(), nullptr}},
  };
  for (const auto& [field, storage] : storages) {
    KVCache cache;
    expect_error(KVCache::wrap(valid_shape(), lminf::MemoryKind::kHost, storage, &cache),
                 StatusCode::kInvalidArgument, field, "wrap " + field);
  }
  KVCache cache;
  CHECK_OK(KVCache::wrap(valid_shape(), lminf::MemoryKind::kHost, complete, &cache));
}

TEST(kv_cache_calls_name_the_bad_argument_and_keep_the_cache) {
  KVCache cache;
  CHECK_OK(KVCache::allocate(valid_shape(), lminf::MemoryKind::kHost, &cache));
  const std::vector<float> inv_freq = rope_inv_freq(8);
  const std::vector<float> q = random_values(2 * 3 * 8, 4), kv = random_values(3 * 8, 5);
  std::vector<float> out(q.size());
  lminf::AttentionConfig attention;
  attention.n_heads_q = 2;
  attention.inv_freq = inv_freq.data();
  attention.rotary_dim = 8;
  CHECK_OK(cache.attend_and_append(attention, q.data(), kv.data(), kv.data(), 3, out.data()));

  lminf::AttentionConfig bad = attention;
  bad.n_heads_q = 0;
  expect_error(cache.attend(bad, q.data(), kv.data(), kv.data(), 3, out.data()),
               StatusCode::kInvalidArgument, "n_heads_q", "attend with 0 query heads");
  bad = attention;
  bad.rotary_dim = 7;
  expect_error(cache.attend_and_append(bad, q.data(), kv.data(), kv.data(), 3, out.data()),
               StatusCode::kInvalidArgument, "rotary_dim", "attend with odd rotary_dim");
  bad = attention;
  bad.distance_cap = -1;
  expect_error(cache.decode(bad, q.data(), kv.data(), kv.data(), out.data()),
               StatusCode::kInvalidArgument, "distance_cap", "decode with negative distance_cap");
  expect_error(cache.attend(attention, nullptr, kv.data(), kv.data(), 3, out.data()),
               StatusCode::kInvalidArgument, "q", "attend with null q");
  expect_error(cache.append(kv.data(), nullptr, 3), StatusCode::kInvalidArgument, "v",
               "append with null v");
  expect_error(cache.append(kv.data(), kv.data(), -3), StatusCode::kInvalidArgument, "n_tokens",
               "append a negative count");
  expect_error(cache.attend(attention, q.data(), kv.data(), kv.data(), -1, out.data()),
               StatusCode::kInvalidArgument, "n_tokens", "attend a negative count");
  CHECK(cache.n_seen() == 3) << "failed calls moved the cache to " << cache.n_seen();
  CHECK(cache.storage().slot_positions[1] == 1 && *cache.storage().next_position == 3);

  KVCache empty;
  expect_error(empty.append(kv.data(), kv.data(), 3), StatusCode::kInvalidArgument, "no storage",
               "append to an empty cache");
}

TEST(cuda_memory_in_a_cpu_build_is_unsupported) {
  if (LMINF_TEST_CUDA_BUILT) return;  // with CUDA built in, the outcome depends on the machine
  KVCache cache;
  expect_error(KVCache::allocate(valid_shape(), lminf::MemoryKind::kCuda, &cache),
               StatusCode::kUnsupported, "CUDA", "allocate in CUDA memory");
}
