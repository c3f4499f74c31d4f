#include "lminf/kv_cache.h"

#include <algorithm>
#include <cmath>
#include <new>
#include <utility>

#include "lminf/lambda_attention.h"
#include "lminf/ring_kv_cache.h"
#include "memory.h"
#include "message.h"

namespace lminf {
namespace {

template <typename... Parts>
Status invalid(const char* function, const Parts&... parts) {
  return detail::invalid("KVCache::", function, ": ", parts...);
}

// Errors of the kernels' own checks keep their code and gain the name of the KVCache call.
Status in_call(const char* function, const Status& status) {
  if (status.ok()) return status;
  return {status.code(), std::string("KVCache::") + function + ": " + status.message()};
}

size_t round_up(size_t bytes) {
  const size_t a = detail::kAllocationAlignment;
  return (bytes + a - 1) / a * a;
}

Status check_shape(const char* function, const KVCacheShape& s) {
  if (s.dtype != DType::kFloat32 && s.dtype != DType::kBFloat16 && s.dtype != DType::kFloat16)
    return invalid(function, "shape.dtype must be float32, bfloat16 or float16");
  if (s.batch < 1) return invalid(function, "shape.batch must be >= 1, got ", s.batch);
  if (s.n_heads_kv < 1)
    return invalid(function, "shape.n_heads_kv must be >= 1, got ", s.n_heads_kv);
  if (s.head_dim < 1) return invalid(function, "shape.head_dim must be >= 1, got ", s.head_dim);
  if (s.n_global < 0) return invalid(function, "shape.n_global must be >= 0, got ", s.n_global);
  if (s.n_local < 1) return invalid(function, "shape.n_local must be >= 1, got ", s.n_local);
  // Byte counts are products of these sizes: refuse a shape whose product would wrap around
  // (and allocate a small buffer that the kernels then overrun).
  int64_t bytes = 0;
  if (__builtin_add_overflow(s.n_global, s.n_local, &bytes) ||
      __builtin_mul_overflow(bytes, s.batch, &bytes) ||
      __builtin_mul_overflow(bytes, s.n_heads_kv, &bytes) ||
      __builtin_mul_overflow(bytes, s.head_dim, &bytes) ||
      __builtin_mul_overflow(bytes, int64_t{dtype_size(s.dtype)}, &bytes)) {
    return invalid(function,
                   "shape: batch x n_heads_kv x (n_global + n_local) x head_dim elements "
                   "overflow 64 bits");
  }
  return Status::Ok();
}

Status check_memory(const char* function, MemoryKind memory) {
  if (memory != MemoryKind::kHost && memory != MemoryKind::kCuda)
    return invalid(function, "memory must be MemoryKind::kHost or MemoryKind::kCuda");
  return Status::Ok();
}

int64_t slots(const KVCacheShape& s) { return s.n_global + s.n_local; }

// How the kernels see the cache's positions: one shared row (uniform batch) or one row per
// sequence, and the padding of a ragged chunk (null: none), in memory the kernels read.
struct SequenceLayout {
  bool uniform = true;
  const int64_t* padding = nullptr;
};

// The kernel's view of n_tokens new tokens (dense q, k, v, out) attending to a cache.
LambdaAttentionParams chunk_attention_params(const KVCacheShape& shape,
                                             const KVCacheStorage& storage,
                                             const AttentionConfig& attention, const void* q,
                                             const void* k, const void* v, int64_t n_tokens,
                                             void* out, SequenceLayout layout = {}) {
  const int64_t d = shape.head_dim, heads_q = attention.n_heads_q, heads_kv = shape.n_heads_kv;
  LambdaAttentionParams p;
  p.dtype = shape.dtype;
  p.q = dense_view(q, heads_q, n_tokens, d);
  p.k = dense_view(k, heads_kv, n_tokens, d);
  p.v = dense_view(v, heads_kv, n_tokens, d);
  p.cache_k = dense_view<const void>(storage.keys, heads_kv, slots(shape), d);
  p.cache_v = dense_view<const void>(storage.values, heads_kv, slots(shape), d);
  p.cache_positions = {storage.slot_positions, layout.uniform ? 0 : slots(shape)};
  p.cache_len = slots(shape);
  p.query_start = {storage.next_position, layout.uniform ? 0 : 1};
  p.padding = layout.padding;
  p.out = dense_view(out, heads_q, n_tokens, d);
  p.inv_freq = attention.inv_freq;
  p.rotary_dim = attention.rotary_dim;
  p.batch = shape.batch;
  p.n_heads_q = attention.n_heads_q;
  p.n_heads_kv = shape.n_heads_kv;
  p.n_queries = n_tokens;
  p.head_dim = d;
  p.n_global = shape.n_global;
  p.n_local = shape.n_local;
  p.distance_cap = attention.distance_cap.value_or(shape.n_local);
  p.scale = attention.scale.value_or(1.0f / std::sqrt(static_cast<float>(d)));
  return p;
}

// The kernel's view of n_tokens new tokens (dense k, v) written into a cache.
RingCacheAppendParams chunk_append_params(const KVCacheShape& shape, const KVCacheStorage& storage,
                                          const void* k, const void* v, int64_t n_tokens,
                                          SequenceLayout layout = {}) {
  const int64_t d = shape.head_dim, heads_kv = shape.n_heads_kv;
  RingCacheAppendParams p;
  p.dtype = shape.dtype;
  p.cache_k = dense_view(storage.keys, heads_kv, slots(shape), d);
  p.cache_v = dense_view(storage.values, heads_kv, slots(shape), d);
  p.cache_positions = {storage.slot_positions, layout.uniform ? 0 : slots(shape)};
  p.k = dense_view(k, heads_kv, n_tokens, d);
  p.v = dense_view(v, heads_kv, n_tokens, d);
  p.start_position = {storage.next_position, layout.uniform ? 0 : 1};
  p.padding = layout.padding;
  p.batch = shape.batch;
  p.n_heads_kv = shape.n_heads_kv;
  p.n_new = n_tokens;
  p.head_dim = shape.head_dim;
  p.n_global = shape.n_global;
  p.n_local = shape.n_local;
  return p;
}

// Position held by ring slot `slot` once positions 0 .. n_seen - 1 have been appended (-1:
// empty): the latest such position p with ring_slot(p) == slot.
int64_t ring_slot_position(int64_t slot, int64_t n_seen, int64_t n_global, int64_t n_local) {
  if (slot < n_global) return slot < n_seen ? slot : -1;
  if (n_seen <= n_global) return -1;
  const int64_t last = n_seen - 1, index = slot - n_global;
  const int64_t last_index = (last - n_global) % n_local;
  const int64_t p = last - ((last_index - index) % n_local + n_local) % n_local;
  return p >= n_global ? p : -1;
}

bool any_padding(const int64_t* padding, int64_t batch) {
  return padding != nullptr && std::any_of(padding, padding + batch, [](int64_t p) { return p != 0; });
}

}  // namespace

KVCache::KVCache(KVCache&& other) noexcept { *this = std::move(other); }

KVCache& KVCache::operator=(KVCache&& other) noexcept {
  if (this != &other) {
    release();
    shape_ = other.shape_;
    memory_ = other.memory_;
    storage_ = std::exchange(other.storage_, KVCacheStorage{});
    owns_storage_ = std::exchange(other.owns_storage_, false);
    n_seen_ = std::exchange(other.n_seen_, {});
    uniform_ = std::exchange(other.uniform_, true);
  }
  return *this;
}

KVCache::~KVCache() { release(); }

void KVCache::release() {
  // The library allocates the four buffers as one block that starts at keys.
  if (owns_storage_) detail::deallocate(memory_, storage_.keys);
  storage_ = KVCacheStorage{};
  owns_storage_ = false;
  n_seen_.clear();
  uniform_ = true;
}

size_t KVCache::slot_bytes(const KVCacheShape& shape) {
  return static_cast<size_t>(shape.batch * shape.n_heads_kv * slots(shape) * shape.head_dim) *
         dtype_size(shape.dtype);
}

size_t KVCache::position_bytes(const KVCacheShape& shape) {
  return static_cast<size_t>(shape.batch * slots(shape)) * sizeof(int64_t);
}

size_t KVCache::sequence_bytes(const KVCacheShape& shape) {
  return static_cast<size_t>(shape.batch) * sizeof(int64_t);
}

size_t KVCache::storage_bytes() const {
  if (storage_.keys == nullptr) return 0;
  return 2 * slot_bytes(shape_) + position_bytes(shape_) +
         (storage_.padding_rows != nullptr ? 2 : 1) * sequence_bytes(shape_);
}

// The cache over `storage`, emptied; the host counts are its only allocation.
Status KVCache::adopt(const KVCacheShape& shape, MemoryKind memory, const KVCacheStorage& storage,
                      bool owns_storage, KVCache* cache) {
  KVCache fresh;
  fresh.shape_ = shape;
  fresh.memory_ = memory;
  fresh.storage_ = storage;
  fresh.owns_storage_ = owns_storage;
  try {
    fresh.n_seen_.assign(shape.batch, 0);
  } catch (const std::bad_alloc&) {
    if (!owns_storage) fresh.storage_ = KVCacheStorage{};  // never free the caller's memory
    return Status::OutOfMemory("cannot allocate the host counts of " +
                               std::to_string(shape.batch) + " sequences");
  }
  Status s = fresh.reset();
  if (s.ok()) s = detail::synchronize(memory, nullptr);
  if (!s.ok()) {
    if (!owns_storage) fresh.storage_ = KVCacheStorage{};
    return s;
  }
  *cache = std::move(fresh);
  return Status::Ok();
}

Status KVCache::allocate(const KVCacheShape& shape, MemoryKind memory, KVCache* cache) {
  if (Status s = check_shape("allocate", shape); !s.ok()) return s;
  if (Status s = check_memory("allocate", memory); !s.ok()) return s;
  if (cache == nullptr) return invalid("allocate", "cache must not be null");

  // One block: keys | values | slot_positions | next_position | padding_rows, each aligned.
  const size_t kv_bytes = round_up(slot_bytes(shape));
  const size_t positions_bytes = round_up(position_bytes(shape));
  const size_t per_sequence_bytes = round_up(sequence_bytes(shape));
  const size_t total = 2 * kv_bytes + positions_bytes + 2 * per_sequence_bytes;
  void* block = nullptr;
  if (Status s = detail::allocate(memory, total, &block); !s.ok()) return in_call("allocate", s);
  char* bytes = static_cast<char*>(block);
  KVCacheStorage storage;
  storage.keys = bytes;
  storage.values = bytes + kv_bytes;
  storage.slot_positions = reinterpret_cast<int64_t*>(bytes + 2 * kv_bytes);
  storage.next_position = reinterpret_cast<int64_t*>(bytes + 2 * kv_bytes + positions_bytes);
  storage.padding_rows = reinterpret_cast<int64_t*>(bytes + 2 * kv_bytes + positions_bytes +
                                                    per_sequence_bytes);

  // Empty slots are never attended, but zeroed keys and values keep every byte a kernel may
  // load defined (and reproducible).
  Status s = detail::fill_bytes(memory, block, 0, 2 * kv_bytes, nullptr);
  if (s.ok()) s = adopt(shape, memory, storage, /*owns_storage=*/true, cache);
  else detail::deallocate(memory, block);
  return in_call("allocate", s);
}

Status KVCache::wrap(const KVCacheShape& shape, MemoryKind memory, const KVCacheStorage& storage,
                     KVCache* cache) {
  if (Status s = check_shape("wrap", shape); !s.ok()) return s;
  if (Status s = check_memory("wrap", memory); !s.ok()) return s;
  if (cache == nullptr) return invalid("wrap", "cache must not be null");
  if (storage.keys == nullptr) return invalid("wrap", "storage.keys must not be null");
  if (storage.values == nullptr) return invalid("wrap", "storage.values must not be null");
  if (storage.slot_positions == nullptr)
    return invalid("wrap", "storage.slot_positions must not be null");
  if (storage.next_position == nullptr)
    return invalid("wrap", "storage.next_position must not be null");
  return in_call("wrap", adopt(shape, memory, storage, /*owns_storage=*/false, cache));
}

Status KVCache::reset(const Launch& launch) {
  if (storage_.keys == nullptr) return invalid("reset", "the cache holds no storage");
  // Every byte 0xff makes each int64 slot position -1, the mark of an empty slot.
  Status s = detail::fill_bytes(memory_, storage_.slot_positions, 0xff, position_bytes(shape_),
                                launch.stream);
  if (s.ok())
    s = detail::fill_bytes(memory_, storage_.next_position, 0, sequence_bytes(shape_),
                           launch.stream);
  if (!s.ok()) return in_call("reset", s);
  std::fill(n_seen_.begin(), n_seen_.end(), 0);
  uniform_ = true;
  return Status::Ok();
}

// A ragged chunk's padding, read on the host: each value in [0, n_tokens], and each
// sequence's positions within range.
Status KVCache::check_padding(const char* function, const int64_t* padding,
                              int64_t n_tokens) const {
  if (padding == nullptr) return Status::Ok();
  return in_call(function, validate_sequence_positions("n_seen", n_seen_.data(), 1, padding,
                                                       shape_.batch, n_tokens));
}

// Leaves the uniform layout: every sequence's row of slot positions and its next position
// written out (they equal row 0's, which the host knows from the shared count).
Status KVCache::spread_positions(const Launch& launch) {
  const int64_t n = n_seen_[0], n_slots = slots(shape_);
  std::vector<int64_t> row;
  try {
    row.resize(n_slots);
  } catch (const std::bad_alloc&) {
    return Status::OutOfMemory("KVCache::append: cannot allocate one row of slot positions");
  }
  for (int64_t slot = 0; slot < n_slots; ++slot)
    row[slot] = ring_slot_position(slot, n, shape_.n_global, shape_.n_local);
  for (int64_t b = 1; b < shape_.batch; ++b) {
    Status s = detail::copy_from_host(memory_, storage_.slot_positions + b * n_slots, row.data(),
                                      n_slots * sizeof(int64_t), launch.stream);
    if (!s.ok()) return s;
  }
  Status s = detail::copy_from_host(memory_, storage_.next_position, n_seen_.data(),
                                    sequence_bytes(shape_), launch.stream);
  if (!s.ok()) return s;
  uniform_ = false;
  return Status::Ok();
}

size_t KVCache::attention_workspace_bytes(const AttentionConfig& attention,
                                          int64_t n_tokens) const {
  if (memory_ != MemoryKind::kCuda) return 0;
  // The size depends on the sizes and on whether the tensors are 16-byte aligned (the tensor-core
  // path needs both, and scratch). The cache's own buffers, aligned, stand in for the caller's
  // tensors: never read, they give the larger of the two answers.
  return lambda_attention_cuda_workspace_size(
      chunk_attention_params(shape_, storage_, attention, storage_.keys, storage_.keys,
                             storage_.keys, n_tokens, storage_.values));
}

Status KVCache::append(const void* k, const void* v, int64_t n_tokens, const Launch& launch,
                       const int64_t* padding) {
  if (storage_.keys == nullptr) return invalid("append", "the cache holds no storage");
  if (n_tokens < 0) return invalid("append", "n_tokens must be >= 0, got ", n_tokens);
  if (Status s = check_padding("append", padding, n_tokens); !s.ok()) return s;
  const bool ragged = any_padding(padding, shape_.batch);
  const bool on_cuda = memory_ == MemoryKind::kCuda;
  if (ragged && on_cuda && storage_.padding_rows == nullptr)
    return invalid("append", "storage.padding_rows must not be null for a ragged chunk");
  // Sequences that will sit at different positions need one row of positions each; a batch of
  // one stays in the shared layout.
  const bool uniform = uniform_ && !(ragged && shape_.batch > 1);
  const SequenceLayout layout{uniform, ragged ? (on_cuda ? storage_.padding_rows : padding) : nullptr};
  const RingCacheAppendParams p = chunk_append_params(shape_, storage_, k, v, n_tokens, layout);
  // Every argument is checked before the layout changes, so a refused call changes nothing.
  if (Status s = validate(p); !s.ok()) return in_call("append", s);
  if (uniform_ && !uniform) {
    if (Status s = spread_positions(launch); !s.ok()) return in_call("append", s);
  }
  if (ragged && on_cuda) {
    if (Status s = detail::copy_from_host(memory_, storage_.padding_rows, padding,
                                          sequence_bytes(shape_), launch.stream);
        !s.ok()) {
      return in_call("append", s);
    }
  }
  if (Status s = on_cuda ? ring_cache_append_cuda(p, launch.stream) : ring_cache_append_cpu(p);
      !s.ok()) {
    return in_call("append", s);
  }
  for (int64_t b = 0; b < shape_.batch; ++b)
    n_seen_[b] += n_tokens - (ragged ? padding[b] : 0);
  // The shared layout keeps one count on the device; the per-sequence one, one per sequence.
  if (Status s = detail::copy_from_host(memory_, storage_.next_position, n_seen_.data(),
                                        uniform_ ? sizeof(int64_t) : sequence_bytes(shape_),
                                        launch.stream);
      !s.ok()) {
    return in_call("append", s);
  }
  return Status::Ok();
}

Status KVCache::attend(const AttentionConfig& attention, const void* q, const void* k,
                       const void* v, int64_t n_tokens, void* out, const Launch& launch,
                       const int64_t* padding) const {
  if (storage_.keys == nullptr) return invalid("attend", "the cache holds no storage");
  if (n_tokens < 0) return invalid("attend", "n_tokens must be >= 0, got ", n_tokens);
  if (Status s = check_padding("attend", padding, n_tokens); !s.ok()) return s;
  const bool ragged = any_padding(padding, shape_.batch);
  const bool on_cuda = memory_ == MemoryKind::kCuda;
  if (ragged && on_cuda && storage_.padding_rows == nullptr)
    return invalid("attend", "storage.padding_rows must not be null for a ragged chunk");
  // A uniform cache serves a ragged chunk as is: one shared start and row of positions, and
  // each sequence's rows shifted by its padding.
  const SequenceLayout layout{uniform_, ragged ? (on_cuda ? storage_.padding_rows : padding) : nullptr};
  const LambdaAttentionParams p =
      chunk_attention_params(shape_, storage_, attention, q, k, v, n_tokens, out, layout);
  if (memory_ == MemoryKind::kHost)
    return in_call("attend", lambda_attention_cpu(p, launch.n_threads));
  const size_t needed = lambda_attention_cuda_workspace_size(p);
  if (launch.workspace_bytes < needed || (needed > 0 && launch.workspace == nullptr)) {
    return invalid("attend", "launch.workspace must hold ", needed, " bytes of device memory, got ",
                   launch.workspace == nullptr ? 0 : launch.workspace_bytes);
  }
  if (Status s = validate(p); !s.ok()) return in_call("attend", s);
  if (ragged) {
    if (Status s = detail::copy_from_host(memory_, storage_.padding_rows, padding,
                                          sequence_bytes(shape_), launch.stream);
        !s.ok()) {
      return in_call("attend", s);
    }
  }
  return in_call("attend", lambda_attention_cuda(p, launch.workspace, launch.stream));
}

Status KVCache::attend_and_append(const AttentionConfig& attention, const void* q, const void* k,
                                  const void* v, int64_t n_tokens, void* out,
                                  const Launch& launch, const int64_t* padding) {
  if (Status s = attend(attention, q, k, v, n_tokens, out, launch, padding); !s.ok()) return s;
  return append(k, v, n_tokens, launch, padding);
}

Status KVCache::decode(const AttentionConfig& attention, const void* q, const void* k,
                       const void* v, void* out, const Launch& launch) {
  return attend_and_append(attention, q, k, v, 1, out, launch);
}

}  // namespace lminf
