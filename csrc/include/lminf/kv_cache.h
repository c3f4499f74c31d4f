// lminf::KVCache: one layer's LM-Infinite KV cache with streaming attention, for C++ pipelines.
//
// A KVCache keeps the unrotated keys and values of the first n_global tokens and the last
// n_local tokens of a stream (the ring buffer of ring_kv_cache.h) and attends each new chunk of
// queries to them and to the chunk itself (the Λ-shaped attention of lambda_attention.h). Its
// memory is fixed at creation, whatever the stream length.
//
// Typical loop, per layer, for each chunk of n_tokens new tokens (n_tokens = 1 when decoding):
//   cache.attend_and_append(attention, q, k, v, n_tokens, out);
//
// Sequences of different lengths: each sequence of the batch has its own position (n_seen(b)).
// A ragged chunk is left-padded: padding[b] (host memory, [batch], in [0, n_tokens]) leading
// rows of sequence b are padding, neither attended to nor stored, and their output rows are
// zeros; the other n_tokens - padding[b] rows are that sequence's next tokens. Each sequence
// then gets exactly what it gets streamed alone. While every sequence sits at the same
// position the cache keeps one shared row of positions (the kernels' batch-uniform layout,
// no extra work); the first ragged append spreads it to one row per sequence until reset().
//
// Conventions for every function below:
//   * Nothing throws. Every call returns a Status; a bad argument leaves the cache unchanged
//     and the message names the argument.
//   * Tensors are dense, row-major, in the cache's dtype and in the cache's memory (host
//     memory for MemoryKind::kHost, CUDA device memory for MemoryKind::kCuda).
//   * On a host cache, calls run on the calling thread with OpenMP workers and return when the
//     result is written. On a CUDA cache, reset, append and attend are enqueued on
//     launch.stream and return at once; allocate and wrap synchronise.
//   * The cache counts tokens on the host (n_seen) and, for CUDA, copies the count to the
//     device after each append (8 bytes, cudaMemcpyAsync). To capture a decoding loop in a
//     CUDA graph, call the kernels of lambda_attention.h and ring_kv_cache.h directly with a
//     position that lives and advances on the device.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <vector>

#include "lminf/dtype.h"
#include "lminf/export.h"
#include "lminf/status.h"

namespace lminf {

// Where a cache's storage lives, and so which kernels its calls run.
enum class MemoryKind : int { kHost = 0, kCuda = 1 };

// The fixed geometry of one layer's cache.
struct KVCacheShape {
  DType dtype = DType::kFloat32;  // element type of the keys, values, queries and outputs
  int64_t batch = 1;              // sequences streamed side by side, each at its own position
  int64_t n_heads_kv = 0;         // key/value heads
  int64_t head_dim = 0;           // features per head
  int64_t n_global = 10;          // G: the first G tokens stay visible at any distance (>= 0)
  int64_t n_local = 0;            // L: the last L tokens, the attention window (>= 1)
};

// Storage of one cache, for a cache over memory the caller owns (KVCache::wrap). All four
// buffers live in the same MemoryKind and must outlive the cache.
struct KVCacheStorage {
  void* keys = nullptr;               // [batch, n_heads_kv, n_global + n_local, head_dim], dtype
  void* values = nullptr;             // [batch, n_heads_kv, n_global + n_local, head_dim], dtype
  // [batch, n_global + n_local] position held by each slot of each sequence, -1 = empty. While
  // the batch is uniform (every sequence at one position, no ragged append since reset) only
  // row 0 is kept up to date.
  int64_t* slot_positions = nullptr;
  int64_t* next_position = nullptr;   // [batch] position of each sequence's next token (row 0
                                      // only while the batch is uniform)
  // [batch] scratch in the cache's memory where a CUDA cache copies a ragged chunk's padding
  // for the kernels; unused by a host cache. Null: a CUDA cache refuses ragged chunks.
  int64_t* padding_rows = nullptr;
};

// The attention a layer computes over its cache; the same for every call of a stream.
struct AttentionConfig {
  int64_t n_heads_q = 0;            // query heads, a multiple of n_heads_kv (GQA when larger)
  const float* inv_freq = nullptr;  // [rotary_dim / 2] RoPE frequencies, float32, in the
                                    // cache's memory
  int64_t rotary_dim = 0;           // even, <= head_dim: RoPE (rotate_half) acts on the first
                                    // rotary_dim features
  // D, the rotary distance given to global keys beyond the window; n_local if unset.
  std::optional<int64_t> distance_cap;
  std::optional<float> scale;  // score multiplier; head_dim^-0.5 if unset
};

// How a call runs. Host caches read n_threads; CUDA caches read the rest.
struct Launch {
  int n_threads = 0;          // host: OpenMP threads (<= 0: the OpenMP default)
  void* stream = nullptr;     // CUDA: the cudaStream_t the work is enqueued on (null: default)
  void* workspace = nullptr;  // CUDA: device scratch for attention, at least
                              // KVCache::attention_workspace_bytes(...) bytes
  size_t workspace_bytes = 0;
};

class LMINF_API KVCache {
 public:
  // An empty cache that holds nothing; every call on it returns an error.
  KVCache() = default;
  KVCache(KVCache&& other) noexcept;
  KVCache& operator=(KVCache&& other) noexcept;
  KVCache(const KVCache&) = delete;
  KVCache& operator=(const KVCache&) = delete;
  ~KVCache();  // frees the storage if the library allocated it

  // Allocates the storage in `memory` and empties it. CUDA memory is allocated with cudaMalloc
  // and emptied synchronously; kUnsupported in a build without CUDA.
  static Status allocate(const KVCacheShape& shape, MemoryKind memory, KVCache* cache);

  // Builds a cache over storage the caller owns (never freed by the cache) and empties it, as
  // allocate() does (CUDA: synchronously). Keys and values are not touched.
  static Status wrap(const KVCacheShape& shape, MemoryKind memory, const KVCacheStorage& storage,
                     KVCache* cache);

  // Bytes of each buffer of KVCacheStorage for `shape`: keys and values each take
  // slot_bytes(shape), slot_positions position_bytes(shape), next_position and padding_rows
  // sequence_bytes(shape) (batch int64 values).
  static size_t slot_bytes(const KVCacheShape& shape);
  static size_t position_bytes(const KVCacheShape& shape);
  static size_t sequence_bytes(const KVCacheShape& shape);

  // Device scratch a CUDA cache needs to attend n_tokens queries of `attention` at once; 0 for
  // a host cache. It depends on sizes only, so one allocation serves every layer, but not
  // monotonically on n_tokens (decoding splits the keys across blocks, a long chunk does not):
  // allocate the largest over the chunk sizes the stream uses.
  size_t attention_workspace_bytes(const AttentionConfig& attention, int64_t n_tokens) const;

  // Forgets every token: the next token appended sits at position 0.
  Status reset(const Launch& launch = {});

  // Stores the keys and values of the next n_tokens tokens (for sequence b, positions
  // n_seen(b) .. n_seen(b) + n_tokens - padding[b] - 1). Keeps the first n_global and the last
  // n_local of each sequence's stream.
  //   k, v:    [batch, n_heads_kv, n_tokens, head_dim]
  //   padding: [batch] in host memory, leading padding rows per sequence; null: none
  Status append(const void* k, const void* v, int64_t n_tokens, const Launch& launch = {},
                const int64_t* padding = nullptr);

  // Attention output of the next n_tokens tokens over the cache and the chunk itself (each
  // query sees the chunk's keys up to its own position). Does not store the chunk.
  //   q:       [batch, n_heads_q, n_tokens, head_dim]
  //   k, v:    [batch, n_heads_kv, n_tokens, head_dim]
  //   out:     [batch, n_heads_q, n_tokens, head_dim], written (padding rows as zeros)
  //   padding: as in append()
  Status attend(const AttentionConfig& attention, const void* q, const void* k, const void* v,
                int64_t n_tokens, void* out, const Launch& launch = {},
                const int64_t* padding = nullptr) const;

  // attend() then append(): one step of a stream. Shapes as in attend().
  Status attend_and_append(const AttentionConfig& attention, const void* q, const void* k,
                           const void* v, int64_t n_tokens, void* out, const Launch& launch = {},
                           const int64_t* padding = nullptr);

  // One decoding step: attend_and_append() of a single token.
  //   q, out: [batch, n_heads_q, 1, head_dim];  k, v: [batch, n_heads_kv, 1, head_dim]
  Status decode(const AttentionConfig& attention, const void* q, const void* k, const void* v,
                void* out, const Launch& launch = {});

  const KVCacheShape& shape() const { return shape_; }
  MemoryKind memory() const { return memory_; }
  const KVCacheStorage& storage() const { return storage_; }
  bool owns_storage() const { return owns_storage_; }
  // Tokens of sequence `sequence` appended since the last reset (the position of its next
  // token); 0 for an index outside [0, batch).
  int64_t n_seen(int64_t sequence = 0) const {
    return sequence >= 0 && sequence < static_cast<int64_t>(n_seen_.size()) ? n_seen_[sequence]
                                                                             : 0;
  }
  // Whether every sequence sits at one position with one shared row of slot positions.
  bool uniform() const { return uniform_; }
  // Bytes of storage the cache uses, fixed at creation.
  size_t storage_bytes() const;

 private:
  void release();
  static Status adopt(const KVCacheShape& shape, MemoryKind memory, const KVCacheStorage& storage,
                      bool owns_storage, KVCache* cache);
  Status check_padding(const char* function, const int64_t* padding, int64_t n_tokens) const;
  Status spread_positions(const Launch& launch);

  KVCacheShape shape_;
  MemoryKind memory_ = MemoryKind::kHost;
  KVCacheStorage storage_;
  bool owns_storage_ = false;
  std::vector<int64_t> n_seen_;  // [batch] host copy of next_position
  bool uniform_ = true;          // one shared row of positions (row 0) serves the batch
};

}  // namespace lminf
