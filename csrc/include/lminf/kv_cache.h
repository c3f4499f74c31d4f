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

#include "lminf/dtype.h"
#include "lminf/export.h"
#include "lminf/status.h"

namespace lminf {

// Where a cache's storage lives, and so which kernels its calls run.
enum class MemoryKind : int { kHost = 0, kCuda = 1 };

// The fixed geometry of one layer's cache.
struct KVCacheShape {
  DType dtype = DType::kFloat32;  // element type of the keys, values, queries and outputs
  int64_t batch = 1;              // sequences streamed side by side, all at the same position
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
  int64_t* slot_positions = nullptr;  // [n_global + n_local] position held by each slot
  int64_t* next_position = nullptr;   // [1] position of the next token to arrive
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
  // slot_bytes(shape), slot_positions position_bytes(shape), next_position sizeof(int64_t).
  static size_t slot_bytes(const KVCacheShape& shape);
  static size_t position_bytes(const KVCacheShape& shape);

  // Device scratch a CUDA cache needs to attend n_tokens queries of `attention` at once; 0 for
  // a host cache. It depends on sizes only, so one allocation serves every layer, but not
  // monotonically on n_tokens (decoding splits the keys across blocks, a long chunk does not):
  // allocate the largest over the chunk sizes the stream uses.
  size_t attention_workspace_bytes(const AttentionConfig& attention, int64_t n_tokens) const;

  // Forgets every token: the next token appended sits at position 0.
  Status reset(const Launch& launch = {});

  // Stores the keys and values of the next n_tokens tokens (positions n_seen() ..
  // n_seen() + n_tokens - 1). Keeps the first n_global and the last n_local of the stream.
  //   k, v: [batch, n_heads_kv, n_tokens, head_dim]
  Status append(const void* k, const void* v, int64_t n_tokens, const Launch& launch = {});

  // Attention output of the next n_tokens tokens over the cache and the chunk itself (each
  // query sees the chunk's keys up to its own position). Does not store the chunk.
  //   q:    [batch, n_heads_q, n_tokens, head_dim]
  //   k, v: [batch, n_heads_kv, n_tokens, head_dim]
  //   out:  [batch, n_heads_q, n_tokens, head_dim], written
  Status attend(const AttentionConfig& attention, const void* q, const void* k, const void* v,
                int64_t n_tokens, void* out, const Launch& launch = {}) const;

  // attend() then append(): one step of a stream. Shapes as in attend().
  Status attend_and_append(const AttentionConfig& attention, const void* q, const void* k,
                           const void* v, int64_t n_tokens, void* out, const Launch& launch = {});

  // One decoding step: attend_and_append() of a single token.
  //   q, out: [batch, n_heads_q, 1, head_dim];  k, v: [batch, n_heads_kv, 1, head_dim]
  Status decode(const AttentionConfig& attention, const void* q, const void* k, const void* v,
                void* out, const Launch& launch = {});

  const KVCacheShape& shape() const { return shape_; }
  MemoryKind memory() const { return memory_; }
  const KVCacheStorage& storage() const { return storage_; }
  bool owns_storage() const { return owns_storage_; }
  // Tokens appended since the last reset (the position of the next token).
  int64_t n_seen() const { return n_seen_; }
  // Bytes of storage the cache uses, fixed at creation.
  size_t storage_bytes() const;

 private:
  void release();

  KVCacheShape shape_;
  MemoryKind memory_ = MemoryKind::kHost;
  KVCacheStorage storage_;
  bool owns_storage_ = false;
  int64_t n_seen_ = 0;
};

}  // namespace lminf
