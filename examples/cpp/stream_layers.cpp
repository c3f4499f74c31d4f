// Streams a long synthetic sequence through several layers' LM-Infinite caches, as an
// inference engine would: chunked prefill, then token-by-token decoding. Each layer's output
// is the next layer's query. At a few positions the outputs are recomputed by a naive
// double-precision loop over the whole history, which must agree.
//
// Keys and values are a pure function of (layer, position, head, feature), so the naive check
// can regenerate any past token without the stream being stored anywhere.
#include <lminf/lminf.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <set>
#include <vector>

namespace {

constexpr int64_t kLayers = 4;
constexpr int64_t kHeadsQ = 9, kHeadsKV = 3, kHeadDim = 64;  // SmolLM2-135M's attention
constexpr int64_t kGlobal = 10, kLocal = 256;
constexpr int64_t kPrefillTokens = 10000, kChunk = 100, kDecodeTokens = 24;
constexpr int64_t kTokens = kPrefillTokens + kDecodeTokens;

// A value in [-1, 1) determined by its coordinates (splitmix64 of their mix).
float synthetic(uint64_t layer, uint64_t which, uint64_t position, uint64_t head, uint64_t f) {
  uint64_t x =
      ((((layer * 3 + which) * 1000003 + position) * 64 + head) * 1024 + f) + 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  x ^= x >> 31;
  return static_cast<float>(x >> 40) / static_cast<float>(1ull << 23) - 1.0f;
}

enum Which : uint64_t { kQuery = 0, kKey = 1, kValue = 2 };

// [kHeads, n, kHeadDim] (batch 1) for the tokens at positions start .. start + n - 1.
std::vector<float> synthetic_tokens(int64_t layer, Which which, int64_t heads, int64_t start,
                                    int64_t n) {
  std::vector<float> x(heads * n * kHeadDim);
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t t = 0; t < n; ++t)
      for (int64_t f = 0; f < kHeadDim; ++f)
        x[(h * n + t) * kHeadDim + f] = synthetic(layer, which, start + t, h, f);
  return x;
}

// Section 1 of the design, naively: query q (one head, unrotated) at position i over every
// earlier token of the layer, with RoPE applied at the absolute positions in double.
std::vector<double> naive_attention(int64_t layer, int64_t head, const float* q, int64_t i,
                                    const std::vector<float>& inv_freq) {
  auto rotate = [&](std::vector<double> x, int64_t p) {
    const int64_t half = kHeadDim / 2;
    for (int64_t f = 0; f < half; ++f) {
      const double c = std::cos(p * static_cast<double>(inv_freq[f]));
      const double s = std::sin(p * static_cast<double>(inv_freq[f]));
      const double x1 = x[f], x2 = x[f + half];
      x[f] = x1 * c - x2 * s;
      x[f + half] = x2 * c + x1 * s;
    }
    return x;
  };
  const int64_t kv_head = head / (kHeadsQ / kHeadsKV);
  const std::vector<double> query(q, q + kHeadDim);
  std::vector<double> scores, out(kHeadDim, 0.0);
  std::vector<int64_t> keys;
  for (int64_t j = 0; j <= i; ++j) {
    const bool local = i - j < kLocal, global = j < kGlobal;
    if (!local && !global) continue;
    std::vector<double> key(kHeadDim);
    for (int64_t f = 0; f < kHeadDim; ++f) key[f] = synthetic(layer, kKey, j, kv_head, f);
    // Local: both rotated at their own positions. Global beyond the window: the key at
    // rotation 0, the query at distance kLocal (distance_cap defaults to n_local).
    const std::vector<double> rq = local ? rotate(query, i) : rotate(query, kLocal);
    const std::vector<double> rk = local ? rotate(key, j) : key;
    double dot = 0.0;
    for (int64_t f = 0; f < kHeadDim; ++f) dot += rq[f] * rk[f];
    scores.push_back(dot / std::sqrt(static_cast<double>(kHeadDim)));
    keys.push_back(j);
  }
  const double max_score = *std::max_element(scores.begin(), scores.end());
  double total = 0.0;
  for (size_t n = 0; n < keys.size(); ++n) {
    const double w = std::exp(scores[n] - max_score);
    total += w;
    for (int64_t f = 0; f < kHeadDim; ++f)
      out[f] += w * synthetic(layer, kValue, keys[n], kv_head, f);
  }
  for (double& x : out) x /= total;
  return out;
}

bool check(const lminf::Status& status, const char* what) {
  if (!status.ok()) std::fprintf(stderr, "%s failed: %s\n", what, status.message().c_str());
  return status.ok();
}

}  // namespace

int main() {
  lminf::KVCacheShape shape;
  shape.n_heads_kv = kHeadsKV;
  shape.head_dim = kHeadDim;
  shape.n_global = kGlobal;
  shape.n_local = kLocal;
  std::vector<lminf::KVCache> caches(kLayers);
  for (lminf::KVCache& cache : caches) {
    if (!check(lminf::KVCache::allocate(shape, lminf::MemoryKind::kHost, &cache), "allocate"))
      return 1;
  }
  std::vector<float> inv_freq(kHeadDim / 2);
  for (int64_t f = 0; f < kHeadDim / 2; ++f)
    inv_freq[f] = static_cast<float>(std::pow(10000.0, -2.0 * f / kHeadDim));
  lminf::AttentionConfig attention;
  attention.n_heads_q = kHeadsQ;
  attention.inv_freq = inv_freq.data();
  attention.rotary_dim = kHeadDim;

  // Positions checked against the naive loop: inside the first chunk, around the first wrap
  // of the window, deep into the stream, and during decoding.
  const std::set<int64_t> checkpoints = {0, 57, kLocal + 3, 4321, kPrefillTokens - 1, kTokens - 1};
  double max_error = 0.0;
  int64_t checked = 0;

  for (int64_t start = 0; start < kTokens;) {
    const int64_t n = start < kPrefillTokens ? std::min(kChunk, kPrefillTokens - start) : 1;
    std::vector<float> q = synthetic_tokens(0, kQuery, kHeadsQ, start, n);
    for (int64_t layer = 0; layer < kLayers; ++layer) {
      const std::vector<float> k = synthetic_tokens(layer, kKey, kHeadsKV, start, n);
      const std::vector<float> v = synthetic_tokens(layer, kValue, kHeadsKV, start, n);
      std::vector<float> out(q.size());
      const lminf::Status status =
          n == 1 ? caches[layer].decode(attention, q.data(), k.data(), v.data(), out.data())
                 : caches[layer].attend_and_append(attention, q.data(), k.data(), v.data(), n,
                                                   out.data());
      if (!check(status, "attention")) return 1;

      for (auto it = checkpoints.lower_bound(start); it != checkpoints.end() && *it < start + n;
           ++it) {
        for (int64_t h = 0; h < kHeadsQ; ++h) {
          const int64_t row = h * n + (*it - start);
          const std::vector<double> want =
              naive_attention(layer, h, &q[row * kHeadDim], *it, inv_freq);
          for (int64_t f = 0; f < kHeadDim; ++f) {
            max_error = std::max(max_error, std::abs(out[row * kHeadDim + f] - want[f]));
          }
        }
        ++checked;
      }
      q = std::move(out);  // the next layer attends with this layer's output
    }
    start += n;
  }

  const bool ok = max_error < 1e-4 && checked == kLayers * static_cast<int64_t>(checkpoints.size());
  std::printf(
      "lminf stream: %lld layers x %lld tokens (prefill chunks of %lld, %lld decode steps), "
      "cache %.2f MiB/layer fixed, max |error| vs naive %.1e at %lld checks: %s\n",
      static_cast<long long>(kLayers), static_cast<long long>(kTokens),
      static_cast<long long>(kChunk), static_cast<long long>(kDecodeTokens),
      caches[0].storage_bytes() / 1048576.0, max_error, static_cast<long long>(checked),
      ok ? "OK" : "FAILED");
  return ok ? 0 : 1;
}
