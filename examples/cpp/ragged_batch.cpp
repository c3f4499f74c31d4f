// Serves a batch of sequences of different lengths with one lminf::KVCache per layer, as a
// batched inference server would: the prompts are prefilled together in one left-padded
// chunk (each sequence's padding rows are neither attended to nor stored), then every
// sequence decodes side by side, each at its own position. Each sequence's outputs must equal
// the same sequence streamed alone through a cache of batch one.
#include <lminf/lminf.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <vector>

namespace {

constexpr int64_t kHeadsQ = 4, kHeadsKV = 2, kHeadDim = 64;
constexpr int64_t kGlobal = 4, kLocal = 32;
constexpr int64_t kDecodeSteps = 40;  // every sequence outgrows the window
const std::vector<int64_t> kPromptLengths = {3, 45, 17};

// A value in [-1, 1) determined by its coordinates (splitmix64 of their mix).
float synthetic(uint64_t sequence, uint64_t which, uint64_t position, uint64_t head, uint64_t f) {
  uint64_t x = ((((sequence * 3 + which) * 1000003 + position) * 64 + head) * 1024 + f) +
               0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  x ^= x >> 31;
  return static_cast<float>(x >> 40) / static_cast<float>(1ull << 23) - 1.0f;
}

// [batch, heads, width, kHeadDim]: for sequence b, tokens at positions start[b] .. start[b] +
// count[b] - 1, right-aligned after width - count[b] padding rows (zeros: never read).
std::vector<float> left_padded(uint64_t which, int64_t heads, const std::vector<int64_t>& sequences,
                               const std::vector<int64_t>& start, const std::vector<int64_t>& count,
                               int64_t width) {
  const int64_t batch = static_cast<int64_t>(sequences.size());
  std::vector<float> x(batch * heads * width * kHeadDim, 0.0f);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t t = 0; t < count[b]; ++t)
        for (int64_t f = 0; f < kHeadDim; ++f)
          x[((b * heads + h) * width + width - count[b] + t) * kHeadDim + f] =
              synthetic(sequences[b], which, start[b] + t, h, f);
  return x;
}

bool check(const lminf::Status& status, const char* what) {
  if (!status.ok()) std::fprintf(stderr, "%s failed: %s\n", what, status.message().c_str());
  return status.ok();
}

// Runs the sequences (ids `sequences`) as one batch: a prefill of their prompts, then decode
// steps. Returns each sequence's outputs at its last prompt token and at every decode step,
// [sequence][step][kHeadsQ * kHeadDim].
bool serve(const std::vector<int64_t>& sequences, const lminf::AttentionConfig& attention,
           std::vector<std::vector<std::vector<float>>>* outputs) {
  const int64_t batch = static_cast<int64_t>(sequences.size());
  lminf::KVCacheShape shape;
  shape.batch = batch;
  shape.n_heads_kv = kHeadsKV;
  shape.head_dim = kHeadDim;
  shape.n_global = kGlobal;
  shape.n_local = kLocal;
  lminf::KVCache cache;
  if (!check(lminf::KVCache::allocate(shape, lminf::MemoryKind::kHost, &cache), "allocate"))
    return false;
  outputs->assign(batch, {});
  std::vector<int64_t> count(batch), start(batch, 0), padding(batch);
  int64_t width = 0;
  for (int64_t b = 0; b < batch; ++b) {
    count[b] = kPromptLengths[sequences[b]];
    width = std::max(width, count[b]);
  }
  for (int64_t step = 0; step <= kDecodeSteps; ++step) {
    for (int64_t b = 0; b < batch; ++b) padding[b] = width - count[b];
    const std::vector<float> q = left_padded(0, kHeadsQ, sequences, start, count, width);
    const std::vector<float> k = left_padded(1, kHeadsKV, sequences, start, count, width);
    const std::vector<float> v = left_padded(2, kHeadsKV, sequences, start, count, width);
    std::vector<float> out(q.size());
    if (!check(cache.attend_and_append(attention, q.data(), k.data(), v.data(), width, out.data(),
                                       {}, padding.data()),
               "attend_and_append"))
      return false;
    // Keep each sequence's newest row (its last prompt token, then its decoded token).
    for (int64_t b = 0; b < batch; ++b) {
      std::vector<float> row;
      for (int64_t h = 0; h < kHeadsQ; ++h) {
        const float* x = &out[((b * kHeadsQ + h) * width + width - 1) * kHeadDim];
        row.insert(row.end(), x, x + kHeadDim);
      }
      (*outputs)[b].push_back(std::move(row));
      start[b] += count[b];
      count[b] = 1;
    }
    width = 1;
  }
  for (int64_t b = 0; b < batch; ++b)
    if (cache.n_seen(b) != kPromptLengths[sequences[b]] + kDecodeSteps) return false;
  return true;
}

}  // namespace

int main() {
  std::vector<float> inv_freq(kHeadDim / 2);
  for (int64_t f = 0; f < kHeadDim / 2; ++f)
    inv_freq[f] = static_cast<float>(std::pow(10000.0, -2.0 * f / kHeadDim));
  lminf::AttentionConfig attention;
  attention.n_heads_q = kHeadsQ;
  attention.inv_freq = inv_freq.data();
  attention.rotary_dim = kHeadDim;

  const int64_t n_sequences = static_cast<int64_t>(kPromptLengths.size());
  std::vector<int64_t> all(n_sequences);
  for (int64_t b = 0; b < n_sequences; ++b) all[b] = b;
  std::vector<std::vector<std::vector<float>>> batched, alone;
  if (!serve(all, attention, &batched)) return 1;
  double max_difference = 0.0;
  for (int64_t b = 0; b < n_sequences; ++b) {
    if (!serve({b}, attention, &alone)) return 1;
    for (size_t step = 0; step < alone[0].size(); ++step)
      for (size_t i = 0; i < alone[0][step].size(); ++i)
        max_difference = std::max<double>(
            max_difference, std::abs(batched[b][step][i] - alone[0][step][i]));
  }
  const bool ok = max_difference < 1e-5;
  std::printf(
      "lminf ragged batch: %lld sequences (prompts of 3, 45, 17 tokens, %lld decode steps), "
      "max |batched - alone| %.1e: %s\n",
      static_cast<long long>(n_sequences), static_cast<long long>(kDecodeSteps), max_difference,
      ok ? "OK" : "FAILED");
  return ok ? 0 : 1;
}
