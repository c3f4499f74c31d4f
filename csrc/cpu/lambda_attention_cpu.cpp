// CPU kernel of LM-Infinite attention: flash-style tiles with an online softmax.
//
// Work is split into tiles of consecutive query tokens of one (batch, kv head); a tile holds
// every query head of the GQA group, so each key block is converted, rotated and transposed
// once and then scored against group * tile_queries rows. For each tile the kernel visits only
// the keys the Λ mask can let through: the window (n_local + tile_queries keys) and the global
// keys, so work grows as n_queries * (n_global + n_local) and no score matrix is ever built.
//
// Rotary positions are relative: a tile anchors at base = (its first query position) -
// n_local, rotates queries by i - base and local keys by j - base (both < n_local +
// tile_queries), so (R_{i-base} q) . (R_{j-base} k) = (R_{i-j} q) . k with only small angles.
// Global keys beyond the window are scored unrotated against R_{distance_cap} q.
//
// Batches of different lengths: each sequence b has its own origin (the position of chunk row
// 0, query_start[b] - padding[b]), its own slot positions and its own padding rows. A tile
// never mixes sequences, so it starts at the sequence's first real row and sees only that
// sequence's keys; padding rows are written as zeros and are no key of anyone.
//
// Non-finite inputs (lambda_attention.h): a row with a NaN or infinite score among the keys
// it sees, or such a value among their values, is NaN; masked keys never reach a row.
//
// Nothing allocates inside the OpenMP region (an exception there would terminate the
// process): the rotary table and every thread's workspace are built before it, sized by
// what a tile can actually hold, and an allocation failure becomes kOutOfMemory.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <new>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "cpu/convert.h"
#include "cpu/rope_table.h"
#include "cpu/simd.h"
#include "lminf/lambda_attention.h"
#include "lminf/lambda_mask.h"

namespace lminf {
namespace cpu {
namespace {

constexpr int kBlockKeys = 4 * kVecWidth;  // keys scored together: four vector registers wide
constexpr int kKeyVecs = kBlockKeys / kVecWidth;
constexpr int kQkRows = kVecRegisters >= 32 ? 4 : 2;  // query rows per QK register tile
constexpr int64_t kTargetTileRows = 256;               // group * tile_queries, L2-resident
// How many keys ahead of the one being scored its rows are prefetched.
constexpr int kPrefetchKeys = 8;
// Cache slots per work item at least, when a tile's keys are split over several (decode).
constexpr int64_t kMinSplitSlots = 1024;
constexpr float kMinusInf = -std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

inline bool is_finite(float x) { return std::fabs(x) <= std::numeric_limits<float>::max(); }

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

template <typename T>
struct KeyRef {
  int64_t position;
  const T* k;
  const T* v;
};

// S[r][c] = sum_d q[r][d] * kt[d][c] for a block of kBlockKeys keys; q is [rows][dp],
// kt [dp][kBlockKeys], scores [rows][kBlockKeys].
void score_block(const float* q, int64_t rows, int64_t dp, const float* kt, float* scores) {
  int64_t r = 0;
  for (; r + kQkRows <= rows; r += kQkRows) {
    vfloat acc[kQkRows][kKeyVecs] = {};
    for (int64_t d = 0; d < dp; ++d) {
      vfloat key[kKeyVecs];
      for (int v = 0; v < kKeyVecs; ++v) key[v] = vload(kt + d * kBlockKeys + v * kVecWidth);
      for (int i = 0; i < kQkRows; ++i) {
        const vfloat qb = vbroadcast(q[(r + i) * dp + d]);
        for (int v = 0; v < kKeyVecs; ++v) acc[i][v] += qb * key[v];
      }
    }
    for (int i = 0; i < kQkRows; ++i)
      for (int v = 0; v < kKeyVecs; ++v)
        vstore(scores + (r + i) * kBlockKeys + v * kVecWidth, acc[i][v]);
  }
  for (; r < rows; ++r) {
    vfloat acc[kKeyVecs] = {};
    for (int64_t d = 0; d < dp; ++d) {
      const vfloat qb = vbroadcast(q[r * dp + d]);
      for (int v = 0; v < kKeyVecs; ++v) acc[v] += qb * vload(kt + d * kBlockKeys + v * kVecWidth);
    }
    for (int v = 0; v < kKeyVecs; ++v) vstore(scores + r * kBlockKeys + v * kVecWidth, acc[v]);
  }
}

// acc[r][:] += sum_{c < n_keys} probs[r][c] * values[c][:], with kNV vectors per row held in
// registers across the whole block (kNV == 0: head_dim only known at run time). values[c]
// points at dp floats: the cache row itself or a converted copy.
template <int kNV>
void accumulate_values(const float* probs, int64_t rows, int n_keys, const float* const* values,
                       float* acc, int64_t dp) {
  if constexpr (kNV == 0) {
    for (int64_t r = 0; r < rows; ++r)
      for (int c = 0; c < n_keys; ++c) {
        const vfloat p = vbroadcast(probs[r * kBlockKeys + c]);
        for (int64_t d = 0; d < dp; d += kVecWidth)
          vstore(acc + r * dp + d, vload(acc + r * dp + d) + p * vload(values[c] + d));
      }
  } else {
    constexpr int kRows = std::max(1, std::min(4, (kVecRegisters - kNV) / kNV));
    int64_t r = 0;
    for (; r < rows; r += kRows) {
      const int n_rows = static_cast<int>(std::min<int64_t>(kRows, rows - r));
      vfloat out[kRows][kNV];
      for (int i = 0; i < kRows; ++i)
        for (int v = 0; v < kNV; ++v)
          out[i][v] = i < n_rows ? vload(acc + (r + i) * dp + v * kVecWidth) : vfloat{};
      for (int c = 0; c < n_keys; ++c) {
        vfloat value[kNV];
        for (int v = 0; v < kNV; ++v) value[v] = vload(values[c] + v * kVecWidth);
        for (int i = 0; i < kRows; ++i) {
          const vfloat p = vbroadcast(i < n_rows ? probs[(r + i) * kBlockKeys + c] : 0.f);
          for (int v = 0; v < kNV; ++v) out[i][v] += p * value[v];
        }
      }
      for (int i = 0; i < n_rows; ++i)
        for (int v = 0; v < kNV; ++v) vstore(acc + (r + i) * dp + v * kVecWidth, out[i][v]);
    }
  }
}

template <typename T>
struct MiddleChoice {
  float score;
  const T* value;
};

// Everything one thread needs for one tile; buffers are sized once per call.
template <typename T>
struct TileWorkspace {
  std::vector<float> q_local, q_global, acc, row_max, row_sum, scores, kt, values, row, zeros;
  std::vector<const float*> value_rows;  // [kBlockKeys] where each key's float32 value is read
  std::vector<uint8_t> poisoned;   // [max_rows] the row saw a non-finite score or value
  std::vector<uint8_t> value_bad;  // [kBlockKeys] the block's key has a non-finite value
  std::vector<KeyRef<T>> local_keys, global_keys;
  std::vector<float> q_middle;        // [group][dp] queries placed at top_k_distance
  std::vector<MiddleChoice<T>> chosen;  // [group][top_k] best middle keys so far
  std::vector<int64_t> n_chosen;        // [group]

  TileWorkspace(int64_t max_rows, int64_t dp, int64_t max_keys, int64_t group, int64_t top_k)
      : q_local(max_rows * dp), q_global(max_rows * dp), acc(max_rows * dp),
        row_max(max_rows), row_sum(max_rows), scores(max_rows * kBlockKeys),
        kt(dp * kBlockKeys), values(kBlockKeys * dp), row(dp), zeros(dp), value_rows(kBlockKeys), poisoned(max_rows),
        value_bad(kBlockKeys), q_middle(group * dp), chosen(group * top_k), n_chosen(group) {
    local_keys.reserve(max_keys);
    global_keys.reserve(max_keys);
  }
};

// A tile's softmax state over part of its keys, for tiles split over several work items:
// [items][max_rows] running maxima, sums, NaN flags and unnormalised outputs [dp].
struct PartialStates {
  int64_t max_rows = 0, dp = 0;
  std::vector<float> acc, row_max, row_sum;
  std::vector<uint8_t> poisoned;

  PartialStates(int64_t items, int64_t max_rows_, int64_t dp_)
      : max_rows(max_rows_), dp(dp_), acc(items * max_rows_ * dp_), row_max(items * max_rows_),
        row_sum(items * max_rows_), poisoned(items * max_rows_) {}
};

template <typename T>
class LambdaAttentionCpu {
 public:
  LambdaAttentionCpu(const LambdaAttentionParams& p, const TopKMiddleParams& m)
      : p_(p),
        m_(m),
        group_(p.n_heads_q / p.n_heads_kv),
        max_query_start_(max_query_start(p)),
        // More than the candidates (the middle store and the chunk) would choose them all.
        top_k_(std::min(m.top_k, m.middle_len + p.n_queries)),
        dp_(round_up(p.head_dim, kVecWidth)),
        half_(p.rotary_dim / 2),
        whole_vectors_(p.head_dim == dp_ && half_ % kVecWidth == 0),
        tile_queries_(std::clamp<int64_t>(kTargetTileRows / group_, 8, 128)),
        // Largest relative offset: a query or key at most n_local + tile_queries - 1 past
        // its tile's anchor, never beyond the last query.
        table_(shared_rope_table(p.inv_freq, half_,
                                 std::min(p.n_local, max_query_start_ + p.n_queries) + tile_queries_ + 1)),
        global_cos_(half_),
        global_sin_(half_),
        middle_cos_(half_),
        middle_sin_(half_) {
    for (int64_t f = 0; f < half_; ++f) {
      const double angle = static_cast<double>(p.distance_cap) * p.inv_freq[f];
      global_cos_[f] = static_cast<float>(std::cos(angle));
      global_sin_[f] = static_cast<float>(std::sin(angle));
      const double middle_angle = static_cast<double>(m.top_k_distance) * p.inv_freq[f];
      middle_cos_[f] = static_cast<float>(std::cos(middle_angle));
      middle_sin_[f] = static_cast<float>(std::sin(middle_angle));
    }
  }

  void run(int n_threads) {
    const int64_t n_tiles = (p_.n_queries + tile_queries_ - 1) / tile_queries_;
    const int64_t n_tile_items = p_.batch * p_.n_heads_kv * n_tiles;
    const int64_t max_threads = n_threads > 0 ? n_threads : omp_get_max_threads();
    // Decode has a tile per (sequence, kv head), fewer than the threads, each over thousands
    // of keys: those tiles' cache slots are split into ranges, one work item each, whose
    // softmax states are merged afterwards (as flash-decoding does on a GPU).
    const int64_t splits =
        n_tile_items >= 2 * max_threads
            ? 1
            : std::max<int64_t>(1, std::min((2 * max_threads + n_tile_items - 1) / n_tile_items,
                                            p_.cache_len / kMinSplitSlots));
    const int64_t n_items = n_tile_items * splits;
    // A tile's key lists hold each cache slot at most once, the chunk's keys of its window
    // and its global chunk keys: bounded by the tensors, whatever n_local and n_global are.
    const int64_t max_keys = p_.cache_len + std::min(p_.n_queries, p_.n_local + tile_queries_) +
                             std::min(p_.n_queries, p_.n_global);
    const int64_t max_rows = group_ * std::min(tile_queries_, p_.n_queries);
    const int threads = static_cast<int>(std::min<int64_t>(max_threads, n_items));
    std::vector<TileWorkspace<T>> workspaces;
    workspaces.reserve(threads);
    for (int i = 0; i < threads; ++i) workspaces.emplace_back(max_rows, dp_, max_keys, group_, top_k_);
    PartialStates partials(splits > 1 ? n_items : 0, max_rows, dp_);
    // What tile item i covers: sequence b, kv head kv_head, query rows [t0, t1).
    struct TileRows {
      int64_t b, kv_head, t0, t1;
    };
    const auto tile_rows = [&](int64_t tile_item) {
      const int64_t tile = tile_item % n_tiles;
      return TileRows{tile_item / (n_tiles * p_.n_heads_kv), (tile_item / n_tiles) % p_.n_heads_kv,
                      tile * tile_queries_, std::min(p_.n_queries, (tile + 1) * tile_queries_)};
    };
#pragma omp parallel num_threads(threads)
    {
      TileWorkspace<T>& ws = workspaces[omp_get_thread_num()];
#pragma omp for schedule(dynamic, 1)
      for (int64_t item = 0; item < n_items; ++item) {
        const int64_t split = item % splits;
        const TileRows t = tile_rows(item / splits);
        const KeyPart part{split * p_.cache_len / splits, (split + 1) * p_.cache_len / splits,
                           split == splits - 1, splits > 1 ? &partials : nullptr, item};
        run_tile(ws, t.b, t.kv_head, t.t0, t.t1, part);
      }
      if (splits > 1) {
#pragma omp for schedule(static)
        for (int64_t tile_item = 0; tile_item < n_tile_items; ++tile_item) {
          const TileRows t = tile_rows(tile_item);
          merge_tile(ws, partials, tile_item * splits, splits, t.b, t.kv_head, t.t0, t.t1);
        }
      }
    }
  }

 private:
  const T* q_row(int64_t b, int64_t h, int64_t t) const { return p_.q.as<const T>().at(b, h, t); }
  T* out_row(int64_t b, int64_t h, int64_t t) const { return p_.out.as<T>().at(b, h, t); }
  // Position of chunk row 0 of sequence b; row t >= padding(b) sits at origin(b) + t.
  int64_t origin(int64_t b) const { return *p_.query_start.of(b) - padding(b); }
  int64_t padding(int64_t b) const { return p_.padding == nullptr ? 0 : p_.padding[b]; }

  KeyRef<T> chunk_key(int64_t b, int64_t h, int64_t s) const {
    return {origin(b) + s, p_.k.as<const T>().at(b, h, s), p_.v.as<const T>().at(b, h, s)};
  }
  KeyRef<T> cache_key(int64_t b, int64_t h, int64_t slot) const {
    return {p_.cache_positions.of(b)[slot], p_.cache_k.as<const T>().at(b, h, slot),
            p_.cache_v.as<const T>().at(b, h, slot)};
  }

  // The keys one work item folds into a tile's rows: the cache slots [slot0, slot1) and, if
  // with_chunk, the chunk's own keys and the middle store. With partials, the item leaves
  // its softmax state in partials' entry `item` for merge_tile instead of writing the output.
  struct KeyPart {
    int64_t slot0, slot1;
    bool with_chunk;
    PartialStates* partials;
    int64_t item;
  };

  // The tile's rows are (query t0 + r / group, head kv_head * group + r % group).
  void run_tile(TileWorkspace<T>& ws, int64_t b, int64_t kv_head, int64_t t0, int64_t t1,
                const KeyPart& part) const {
    // Padding rows are zeros (written by the item with the chunk's keys); the tile proper
    // starts at the sequence's first real row.
    const int64_t pad = padding(b);
    if (t0 < pad && part.with_chunk) {
      std::fill(ws.row.begin(), ws.row.end(), 0.f);
      for (int64_t t = t0; t < std::min(pad, t1); ++t)
        for (int64_t g = 0; g < group_; ++g)
          row_from_float(ws.row.data(), out_row(b, kv_head * group_ + g, t), p_.head_dim);
    }
    t0 = std::max(t0, pad);
    if (t0 >= t1) return;
    const int64_t rows = (t1 - t0) * group_;
    const int64_t start = origin(b);  // position of chunk row 0
    const int64_t first = start + t0, last = start + t1 - 1;
    // Anchor for rotary offsets; never below -1 so offsets stay small near the stream start.
    const int64_t base = std::max<int64_t>(first - p_.n_local, -1);

    for (int64_t r = 0; r < rows; ++r) {
      const int64_t t = t0 + r / group_, h = kv_head * group_ + r % group_;
      float* local = ws.q_local.data() + r * dp_;
      float* global = ws.q_global.data() + r * dp_;
      std::fill(local, local + dp_, 0.f);
      row_to_float(q_row(b, h, t), local, p_.head_dim);
      for (int64_t d = 0; d < p_.head_dim; ++d) local[d] *= p_.scale;  // fold the scale in
      std::copy(local, local + dp_, global);
      rotate_half_inplace(local, table_->cos_row(start + t - base),
                          table_->sin_row(start + t - base), half_);
      rotate_half_inplace(global, global_cos_.data(), global_sin_.data(), half_);
    }
    std::fill(ws.acc.begin(), ws.acc.begin() + rows * dp_, 0.f);
    std::fill(ws.row_max.begin(), ws.row_max.begin() + rows, kMinusInf);
    std::fill(ws.row_sum.begin(), ws.row_sum.begin() + rows, 0.f);
    std::fill(ws.poisoned.begin(), ws.poisoned.begin() + rows, 0);

    // The keys some row sees locally, and the global keys some row sees beyond its window
    // (the last row sees them all). A key can be both (for different rows).
    const KeyRange<int64_t> local = local_keys_of_any(first, last, p_.n_local);
    const KeyRange<int64_t> global = global_keys(last, p_.n_global, p_.n_local);
    ws.local_keys.clear();
    ws.global_keys.clear();
    auto classify = [&](const KeyRef<T>& key) {
      if (local.contains(key.position)) ws.local_keys.push_back(key);
      if (global.contains(key.position)) ws.global_keys.push_back(key);
    };
    const int64_t* slot_positions = p_.cache_positions.of(b);
    for (int64_t slot = part.slot0; slot < part.slot1; ++slot)
      if (slot_positions[slot] >= 0) classify(cache_key(b, kv_head, slot));
    if (part.with_chunk) {
      for (int64_t s = std::max(pad, local.first - start); local.contains(start + s); ++s)
        ws.local_keys.push_back(chunk_key(b, kv_head, s));
      for (int64_t s = pad; global.contains(start + s); ++s)
        ws.global_keys.push_back(chunk_key(b, kv_head, s));
    }

    const KeyRef<T>* global_end = ws.global_keys.data() + ws.global_keys.size();
    for (size_t k0 = 0; k0 < ws.global_keys.size(); k0 += kBlockKeys)
      process_block<false>(ws, ws.global_keys.data() + k0, global_end,
                           std::min<size_t>(kBlockKeys, ws.global_keys.size() - k0), rows, first,
                           base);
    const KeyRef<T>* local_end = ws.local_keys.data() + ws.local_keys.size();
    for (size_t k0 = 0; k0 < ws.local_keys.size(); k0 += kBlockKeys)
      process_block<true>(ws, ws.local_keys.data() + k0, local_end,
                          std::min<size_t>(kBlockKeys, ws.local_keys.size() - k0), rows, first,
                          base);

    if (top_k_ > 0 && part.with_chunk)
      for (int64_t t = std::max(t0, m_.top_k_first_row); t < t1; ++t)
        attend_middle(ws, b, kv_head, t, t - t0);

    if (part.partials != nullptr) {
      PartialStates& saved = *part.partials;
      const int64_t first_row = part.item * saved.max_rows;
      std::copy(ws.acc.begin(), ws.acc.begin() + rows * dp_, saved.acc.begin() + first_row * dp_);
      std::copy(ws.row_max.begin(), ws.row_max.begin() + rows, saved.row_max.begin() + first_row);
      std::copy(ws.row_sum.begin(), ws.row_sum.begin() + rows, saved.row_sum.begin() + first_row);
      std::copy(ws.poisoned.begin(), ws.poisoned.begin() + rows, saved.poisoned.begin() + first_row);
      return;
    }
    for (int64_t r = 0; r < rows; ++r)
      write_row(ws.acc.data() + r * dp_, ws.row_sum[r], ws.poisoned[r],
                out_row(b, kv_head * group_ + r % group_, t0 + r / group_));
  }

  // Output row = acc / sum (zeros for a row that saw no key), or NaN for a poisoned row.
  void write_row(float* acc, float sum, bool poisoned, T* out) const {
    if (poisoned) {
      std::fill(acc, acc + p_.head_dim, kNaN);
    } else {
      const float inv = sum > 0.f ? 1.f / sum : 0.f;
      for (int64_t d = 0; d < p_.head_dim; ++d) acc[d] *= inv;
    }
    row_from_float(acc, out, p_.head_dim);
  }

  // The tile's output from the softmax states its `splits` items left in partials, from
  // entry `first_item` on: each rescaled to the largest maximum, then summed.
  void merge_tile(TileWorkspace<T>& ws, const PartialStates& partials, int64_t first_item,
                  int64_t splits, int64_t b, int64_t kv_head, int64_t t0, int64_t t1) const {
    t0 = std::max(t0, padding(b));
    float* acc = ws.row.data();
    for (int64_t r = 0; r < (t1 - t0) * group_; ++r) {
      float m = kMinusInf, sum = 0.f;
      bool poisoned = false;
      for (int64_t s = 0; s < splits; ++s) {
        const int64_t at = (first_item + s) * partials.max_rows + r;
        m = std::max(m, partials.row_max[at]);
        poisoned |= partials.poisoned[at] != 0;
      }
      std::fill(acc, acc + dp_, 0.f);
      for (int64_t s = 0; s < splits && m != kMinusInf; ++s) {
        const int64_t at = (first_item + s) * partials.max_rows + r;
        if (partials.row_max[at] == kMinusInf) continue;  // this part saw no key of the row
        const float alpha = std::exp(partials.row_max[at] - m);
        sum += alpha * partials.row_sum[at];
        const float* part_acc = partials.acc.data() + at * partials.dp;
        for (int64_t d = 0; d < dp_; ++d) acc[d] += alpha * part_acc[d];
      }
      write_row(acc, sum, poisoned, out_row(b, kv_head * group_ + r % group_, t0 + r / group_));
    }
  }

  // Every cache line of the key's k and v rows, into the caches (a hint: no fault, no wait).
  void prefetch_key(const KeyRef<T>& key) const {
    const int64_t bytes = p_.head_dim * static_cast<int64_t>(sizeof(T));
    for (int64_t at = 0; at < bytes; at += 64) {
      __builtin_prefetch(reinterpret_cast<const char*>(key.k) + at);
      __builtin_prefetch(reinterpret_cast<const char*>(key.v) + at);
    }
  }

  // The key as float32 into row ([dp_], zero-padded), rotated by its offset from base if
  // local. Where head_dim and the rotary halves are whole vectors, the key is converted and
  // rotated in registers and stored once (a scalar conversion's narrow stores, reloaded as
  // vectors at once, stall store-to-load forwarding); otherwise converted, then rotated.
  template <bool kLocal>
  void load_key(const KeyRef<T>& key, float* row, int64_t base) const {
    const float* cos = kLocal ? table_->cos_row(key.position - base) : nullptr;
    const float* sin = kLocal ? table_->sin_row(key.position - base) : nullptr;
    if (whole_vectors_) {
      for (int64_t f = 0; f < half_; f += kVecWidth) {
        const vfloat x1 = vload_float(key.k + f), x2 = vload_float(key.k + half_ + f);
        if constexpr (kLocal) {
          const vfloat c = vload(cos + f), s = vload(sin + f);
          vstore(row + f, x1 * c - x2 * s);
          vstore(row + half_ + f, x2 * c + x1 * s);
        } else {
          vstore(row + f, x1);
          vstore(row + half_ + f, x2);
        }
      }
      for (int64_t d = 2 * half_; d < dp_; d += kVecWidth) vstore(row + d, vload_float(key.k + d));
      return;
    }
    std::fill(row + p_.head_dim, row + dp_, 0.f);
    row_to_float(key.k, row, p_.head_dim);
    if (kLocal) rotate_half_inplace(row, cos, sin, half_);
  }

  // Key v's value as dp_ float32s, and whether all are finite: the cache row itself where it
  // needs neither conversion nor zero padding (float32, head_dim whole vectors), else
  // converted into copy (in registers, checked on the way, where head_dim is whole vectors).
  const float* value_row(const T* v, float* copy, bool& finite) const {
    if constexpr (std::is_same_v<T, float>) {
      if (whole_vectors_) {
        finite = vall_finite(v, dp_);
        return v;
      }
    } else if (whole_vectors_) {
      vfloat zero_if_finite = {};
      for (int64_t d = 0; d < dp_; d += kVecWidth) {
        const vfloat x = vload_float(v + d);
        zero_if_finite += x * 0.f;
        vstore(copy + d, x);
      }
      finite = vreduce_sum(zero_if_finite) == 0.f;
      return copy;
    }
    std::fill(copy + p_.head_dim, copy + dp_, 0.f);
    row_to_float(v, copy, p_.head_dim);
    finite = vall_finite(copy, dp_);
    return copy;
  }

  // One block of keys: convert (and for local keys rotate) into kt/values, score, mask,
  // then fold into the running softmax of every row.
  template <bool kLocal>
  void process_block(TileWorkspace<T>& ws, const KeyRef<T>* keys, const KeyRef<T>* keys_end,
                     int n_keys, int64_t rows, int64_t first, int64_t base) const {
    float* kt = ws.kt.data();
    float* values = ws.values.data();
    float* row = ws.row.data();
    int64_t lowest = std::numeric_limits<int64_t>::max(), highest = -1;
    const float* q = kLocal ? ws.q_local.data() : ws.q_global.data();
    float* scores = ws.scores.data();
    // Few rows (decode): score each key as soon as it is rotated. Many rows: transpose the
    // block once and score it with the register-tiled kernel.
    const bool direct = rows <= kQkRows;
    bool any_value_bad = false;
    for (int c = 0; c < kBlockKeys; ++c) {
      if (c < n_keys) {
        // Decode reads each key once, from DRAM: ask for a later key's rows now, so that
        // the memory's latency overlaps the work on this one.
        if (keys + c + kPrefetchKeys < keys_end) prefetch_key(keys[c + kPrefetchKeys]);
        load_key<kLocal>(keys[c], row, base);
        bool finite;
        ws.value_rows[c] = value_row(keys[c].v, values + c * dp_, finite);
        // A non-finite value poisons the rows that see its key (below) and must not reach
        // the others through a zero weight (0 * inf is NaN).
        ws.value_bad[c] = !finite;
        any_value_bad |= !finite;
        if (ws.value_bad[c]) ws.value_rows[c] = ws.zeros.data();
        lowest = std::min(lowest, keys[c].position);
        highest = std::max(highest, keys[c].position);
      } else {
        std::fill(row, row + dp_, 0.f);  // past the last key: scored, then masked
      }
      if (direct) {
        for (int64_t r = 0; r < rows; ++r) {
          vfloat dot = {};
          for (int64_t d = 0; d < dp_; d += kVecWidth) dot += vload(q + r * dp_ + d) * vload(row + d);
          scores[r * kBlockKeys + c] = vreduce_sum(dot);
        }
      } else {
        for (int64_t d = 0; d < dp_; ++d) kt[d * kBlockKeys + c] = row[d];
      }
    }
    if (!direct) score_block(q, rows, dp_, kt, scores);

    // Whole-block tests first: most blocks lie entirely inside every row's band (the first row
    // sees the fewest global keys).
    const int64_t last = first + (rows - 1) / group_;
    const KeyRange<int64_t> seen_by_all = kLocal ? local_keys_of_all(first, last, p_.n_local)
                                                 : global_keys(first, p_.n_global, p_.n_local);
    const bool all_visible = n_keys == kBlockKeys && seen_by_all.contains(lowest, highest);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = first + r / group_;
      float* s = scores + r * kBlockKeys;
      if (all_visible) {  // every key seen: the row is poisoned by any non-finite one
        vfloat zero_if_finite = {};
        for (int v = 0; v < kKeyVecs; ++v) zero_if_finite += vload(s + v * kVecWidth) * 0.f;
        if (any_value_bad || vreduce_sum(zero_if_finite) != 0.f) ws.poisoned[r] = 1;
        continue;
      }
      bool bad = false;
      for (int c = 0; c < kBlockKeys; ++c) {
        bool visible = false;
        if (c < n_keys) {  // a global block holds global keys only
          const int64_t distance = i - keys[c].position;
          visible = kLocal ? is_local(distance, p_.n_local)
                           : is_global(distance, /*key_is_global=*/true, p_.n_local);
        }
        if (visible)
          bad |= !is_finite(s[c]) || ws.value_bad[c];
        else
          s[c] = kMinusInf;
      }
      if (bad) ws.poisoned[r] = 1;
    }

    for (int64_t r = 0; r < rows; ++r) {
      float* s = scores + r * kBlockKeys;
      vfloat block_max = vload(s);
      for (int v = 1; v < kKeyVecs; ++v) {
        const vfloat x = vload(s + v * kVecWidth);
        block_max = x > block_max ? x : block_max;
      }
      const float m_block = vreduce_max(block_max);
      const float m_old = ws.row_max[r];
      const float m_new = std::max(m_old, m_block);
      // Nothing visible to this row yet, or the row is NaN whatever follows.
      if (m_new == kMinusInf || ws.poisoned[r]) {
        std::fill(s, s + kBlockKeys, 0.f);
        continue;
      }
      vfloat sum = {};
      for (int v = 0; v < kKeyVecs; ++v) {
        const vfloat x = vload(s + v * kVecWidth);
        const vint visible = x > kMinusInf;
        const vfloat e = vexp_nonpositive(x - m_new);
        vint bits;
        std::memcpy(&bits, &e, sizeof bits);
        bits &= visible;
        vfloat p;
        std::memcpy(&p, &bits, sizeof p);
        vstore(s + v * kVecWidth, p);
        sum += p;
      }
      const float alpha = m_old == kMinusInf ? 0.f : std::exp(m_old - m_new);
      ws.row_sum[r] = ws.row_sum[r] * alpha + vreduce_sum(sum);
      ws.row_max[r] = m_new;
      if (alpha != 1.f) {
        float* acc = ws.acc.data() + r * dp_;
        for (int64_t d = 0; d < dp_; ++d) acc[d] *= alpha;
      }
    }
    accumulate(scores, rows, n_keys, ws.value_rows.data(), ws.acc.data());
  }

  // Top-k middle attention for query t (the tile's rows row_in_tile * group ..): score every
  // candidate middle key against each head of the group, keep each head's top_k, and fold
  // them into that head's running softmax.
  void attend_middle(TileWorkspace<T>& ws, int64_t b, int64_t kv_head, int64_t t,
                     int64_t row_in_tile) const {
    const int64_t start = origin(b), pad = padding(b);
    const KeyRange<int64_t> middle = middle_keys(start + t, p_.n_global, p_.n_local);
    if (middle.empty()) return;
    for (int64_t g = 0; g < group_; ++g) {
      float* q = ws.q_middle.data() + g * dp_;
      std::fill(q, q + dp_, 0.f);
      row_to_float(q_row(b, kv_head * group_ + g, t), q, p_.head_dim);
      for (int64_t d = 0; d < p_.head_dim; ++d) q[d] *= p_.scale;
      rotate_half_inplace(q, middle_cos_.data(), middle_sin_.data(), half_);
    }
    std::fill(ws.n_chosen.begin(), ws.n_chosen.end(), 0);
    auto consider = [&](const T* k, const T* v) {
      float* key = ws.row.data();
      std::fill(key, key + dp_, 0.f);
      row_to_float(k, key, p_.head_dim);
      for (int64_t g = 0; g < group_; ++g) {
        const float* q = ws.q_middle.data() + g * dp_;
        vfloat dot = {};
        for (int64_t d = 0; d < dp_; d += kVecWidth) dot += vload(q + d) * vload(key + d);
        const float score = vreduce_sum(dot);
        if (!is_finite(score)) ws.poisoned[row_in_tile * group_ + g] = 1;  // a candidate is read
        keep_if_among_best(ws.chosen.data() + g * top_k_, ws.n_chosen[g], {score, v});
      }
    };
    // Candidates: the middle store (tokens before the chunk) and the chunk's own early tokens.
    const int64_t* slot_positions = m_.middle_positions.of(b);
    for (int64_t slot = 0; slot < m_.middle_len; ++slot) {
      if (middle.contains(slot_positions[slot]))
        consider(m_.middle_k.as<const T>().at(b, kv_head, slot),
                 m_.middle_v.as<const T>().at(b, kv_head, slot));
    }
    for (int64_t s = std::max(pad, middle.first - start); middle.contains(start + s); ++s) {
      const KeyRef<T> key = chunk_key(b, kv_head, s);
      consider(key.k, key.v);
    }
    float* value = ws.values.data();
    for (int64_t g = 0; g < group_; ++g) {
      const int64_t r = row_in_tile * group_ + g;
      float* acc = ws.acc.data() + r * dp_;
      for (int64_t c = 0; c < ws.n_chosen[g] && !ws.poisoned[r]; ++c) {
        const MiddleChoice<T> choice = ws.chosen[g * top_k_ + c];
        std::fill(value, value + dp_, 0.f);
        row_to_float(choice.value, value, p_.head_dim);
        if (!vall_finite(value, dp_)) {  // zero-padded past head_dim
          ws.poisoned[r] = 1;
          break;
        }
        // One more key in the online softmax of row r.
        const float m_new = std::max(ws.row_max[r], choice.score);
        const float alpha = std::exp(ws.row_max[r] - m_new), weight = std::exp(choice.score - m_new);
        ws.row_sum[r] = ws.row_sum[r] * alpha + weight;
        ws.row_max[r] = m_new;
        for (int64_t d = 0; d < dp_; ++d) acc[d] = acc[d] * alpha + weight * value[d];
      }
    }
  }

  // Keeps the top_k highest-scoring choices in best[0..count); top_k is small (a handful), so
  // replacing the current minimum by a linear scan beats a heap.
  void keep_if_among_best(MiddleChoice<T>* best, int64_t& count, MiddleChoice<T> candidate) const {
    if (count < top_k_) {
      best[count++] = candidate;
      return;
    }
    int64_t worst = 0;
    for (int64_t c = 1; c < count; ++c)
      if (best[c].score < best[worst].score) worst = c;
    if (candidate.score > best[worst].score) best[worst] = candidate;
  }

  void accumulate(const float* probs, int64_t rows, int n_keys, const float* const* values,
                  float* acc) const {
    switch (dp_ / kVecWidth) {
      case 1: return accumulate_values<1>(probs, rows, n_keys, values, acc, dp_);
      case 2: return accumulate_values<2>(probs, rows, n_keys, values, acc, dp_);
      case 3: return accumulate_values<3>(probs, rows, n_keys, values, acc, dp_);
      case 4: return accumulate_values<4>(probs, rows, n_keys, values, acc, dp_);
      case 5: return accumulate_values<5>(probs, rows, n_keys, values, acc, dp_);
      case 6: return accumulate_values<6>(probs, rows, n_keys, values, acc, dp_);
      case 7: return accumulate_values<7>(probs, rows, n_keys, values, acc, dp_);
      case 8: return accumulate_values<8>(probs, rows, n_keys, values, acc, dp_);
      default: return accumulate_values<0>(probs, rows, n_keys, values, acc, dp_);
    }
  }

  const LambdaAttentionParams& p_;
  const TopKMiddleParams& m_;  // top_k == 0: no top-k rows
  const int64_t group_;
  // The largest query_start of the batch: bounds the relative offsets the rotary table holds.
  static int64_t max_query_start(const LambdaAttentionParams& p) {
    int64_t highest = *p.query_start.of(0);
    for (int64_t b = 1; b < p.batch && p.query_start.batch_stride != 0; ++b)
      highest = std::max(highest, *p.query_start.of(b));
    return highest;
  }

  const int64_t max_query_start_;
  const int64_t top_k_;  // middle keys chosen per head: m.top_k, at most the candidates
  const int64_t dp_;    // head_dim rounded up to whole vectors (zero padded)
  const int64_t half_;  // rotary_dim / 2
  const bool whole_vectors_;  // head_dim and half_ are multiples of kVecWidth
  const int64_t tile_queries_;
  const std::shared_ptr<const RopeTable> table_;
  std::vector<float> global_cos_, global_sin_;  // rotation by distance_cap
  std::vector<float> middle_cos_, middle_sin_;  // rotation by top_k_distance
};

template <typename T>
Status run_typed(const LambdaAttentionParams& params, const TopKMiddleParams& top_k,
                 int n_threads) {
  // The only exceptions are allocation failures (the rotary table, the workspaces), all
  // raised before the parallel region.
  try {
    LambdaAttentionCpu<T>(params, top_k).run(n_threads);
  } catch (const std::bad_alloc&) {
    return Status::OutOfMemory("lambda_attention_cpu: cannot allocate the workspace for head_dim=" +
                               std::to_string(params.head_dim) + ", n_local=" +
                               std::to_string(params.n_local));
  } catch (const std::length_error&) {
    return Status::OutOfMemory("lambda_attention_cpu: the workspace for head_dim=" +
                               std::to_string(params.head_dim) + " exceeds the address space");
  }
  return Status::Ok();
}

// Values the CPU kernel reads from host memory: positions in range, finite frequencies.
Status validate_host_values(const LambdaAttentionParams& p) {
  Status status = validate_sequence_positions("query_start", p.query_start.data,
                                              p.query_start.batch_stride, p.padding, p.batch,
                                              p.n_queries);
  if (!status.ok()) return status;
  for (int64_t f = 0; f < p.rotary_dim / 2; ++f)
    if (!is_finite(p.inv_freq[f]))
      return Status::InvalidArgument("inv_freq must be finite, got " +
                                     std::to_string(p.inv_freq[f]) + " at index " +
                                     std::to_string(f));
  return Status::Ok();
}

}  // namespace
}  // namespace cpu

Status lambda_attention_top_k_cpu(const LambdaAttentionParams& params,
                                  const TopKMiddleParams& top_k, int n_threads) {
  Status status = validate(params, top_k);
  if (!status.ok()) return status;
  status = cpu::validate_host_values(params);
  if (!status.ok()) return status;
  if (params.batch == 0 || params.n_queries == 0) return Status::Ok();
  switch (params.dtype) {
    case DType::kFloat32: return cpu::run_typed<float>(params, top_k, n_threads);
    case DType::kBFloat16: return cpu::run_typed<bf16_t>(params, top_k, n_threads);
    case DType::kFloat16: return cpu::run_typed<fp16_t>(params, top_k, n_threads);
  }
  return Status::Ok();
}

Status lambda_attention_cpu(const LambdaAttentionParams& params, int n_threads) {
  return lambda_attention_top_k_cpu(params, TopKMiddleParams{}, n_threads);
}

}  // namespace lminf
