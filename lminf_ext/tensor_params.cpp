// The glue's validation layer: the tensors' structure (rank, dtype, device, shapes that must
// agree, layouts the kernels can write). Scalar ranges and the overflow of sizes and
// positions are the core's (lminf::validate and the kernels' entry points), whose messages
// check_status passes on, so that C++ and Python callers get the same checks.
#include "tensor_params.h"

#include <ATen/MemoryOverlap.h>

#include <cstdlib>
#include <numeric>
#include <string>

#include "checks.h"

namespace lminf_ext {
namespace {

using Named = std::pair<const char*, const torch::Tensor&>;

lminf::DType to_core_dtype(const char* op, const char* name, const torch::Tensor& t) {
  switch (t.scalar_type()) {
    case torch::kFloat32: return lminf::DType::kFloat32;
    case torch::kBFloat16: return lminf::DType::kBFloat16;
    case torch::kFloat16: return lminf::DType::kFloat16;
    default:
      fail(op, std::string(name) + " must be float32, bfloat16 or float16, got " + dtype_str(t));
  }
}

// Kernels need a contiguous last dimension; any other stride pattern is fine as is.
torch::Tensor rows_contiguous(const torch::Tensor& t) {
  return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous();
}

void check_4d(const char* op, const char* name, const torch::Tensor& t, const char* layout) {
  require(t.dim() == 4, op, [&] {
    return std::string(name) + " must be 4-D " + layout + ", got shape " + shape_str(t);
  });
}

void check_like(const char* op, const char* name, const torch::Tensor& t, const torch::Tensor& ref,
                const char* ref_name) {
  require(t.scalar_type() == ref.scalar_type(), op, [&] {
    return std::string(name) + " must have the dtype of " + ref_name + " (" + dtype_str(ref) +
           "), got " + dtype_str(t);
  });
  require(t.device() == ref.device(), op, [&] {
    return std::string(name) + " must be on the device of " + ref_name + " (" + device_str(ref) +
           "), got " + device_str(t);
  });
}

void check_dim(const char* op, const char* name, const torch::Tensor& t, int dim, int64_t expected,
               const char* what) {
  require(t.size(dim) == expected, op, [&] {
    return std::string(name) + ".size(" + std::to_string(dim) + ") must equal " + what + " (" +
           std::to_string(expected) + "), got shape " + shape_str(t);
  });
}

void check_same_shape(const char* op, const char* name, const torch::Tensor& t,
                      const char* ref_name, const torch::Tensor& ref) {
  require(t.sizes() == ref.sizes(), op, [&] {
    return std::string(name) + " must have " + ref_name + "'s shape " + shape_str(ref) + ", got " +
           shape_str(t);
  });
}

void check_device(const char* op, const char* name, const torch::Tensor& t,
                  const torch::Device& device) {
  require(t.device() == device, op, [&] {
    return std::string(name) + " must be on " + device_str(device) + ", got " + device_str(t);
  });
}

// The core's view of a [batch, heads, rows, features] tensor: its pointer and first three
// strides (in elements, as the core counts them).
template <class T>
lminf::StridedView<T> strided_view(const torch::Tensor& t) {
  return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)};
}

// A tensor the kernel reads through a pointer and a batch stride, with that stride.
struct Strided {
  torch::Tensor tensor;
  int64_t batch_stride;

  // The core's view: a row (or value) per sequence, or one shared (batch_stride 0).
  template <class T>
  lminf::PerSequence<T> view() const {
    return {tensor.data_ptr<int64_t>(), batch_stride};
  }
};

// Slot positions: int64 [length] shared by the batch (batch stride 0) or [batch, length], one
// row per sequence (batch stride length once contiguous).
Strided slot_positions(const char* op, const char* name, const torch::Tensor& t, int64_t batch,
                       int64_t length, const torch::Device& device, const char* what) {
  const bool shared = t.dim() == 1 && t.size(0) == length;
  const bool per_sequence = t.dim() == 2 && t.size(0) == batch && t.size(1) == length;
  require(t.scalar_type() == torch::kInt64 && (shared || per_sequence), op, [&] {
    return std::string(name) + " must be int64 of shape [" + std::to_string(length) + "] or [" +
           std::to_string(batch) + ", " + std::to_string(length) + "] (" + what +
           ", shared by the batch or one row per sequence), got " + dtype_str(t) + " of shape " +
           shape_str(t);
  });
  check_device(op, name, t, device);
  torch::Tensor contiguous = t.contiguous();
  return {contiguous, per_sequence ? length : 0};
}

// A position per sequence: an int64 tensor with one element (shared by the batch, stride 0)
// or of shape [batch] (stride 1).
Strided sequence_starts(const char* op, const char* name, const torch::Tensor& t, int64_t batch,
                        const torch::Device& device) {
  const bool shared = t.numel() == 1 && t.dim() <= 1;
  const bool per_sequence = t.dim() == 1 && t.size(0) == batch;
  require(t.scalar_type() == torch::kInt64 && (shared || per_sequence), op, [&] {
    return std::string(name) + " must be an int64 tensor with one element (shared by the batch) " +
           "or of shape [" + std::to_string(batch) + "] (one per sequence), got " + dtype_str(t) +
           " of shape " + shape_str(t);
  });
  check_device(op, name, t, device);
  return {t.reshape({-1}).contiguous(), shared ? 0 : 1};
}

// Leading padding rows per sequence: int64 [batch], or none.
torch::Tensor padding_rows(const char* op, const std::optional<torch::Tensor>& padding,
                           int64_t batch, const torch::Device& device) {
  if (!padding) return {};
  const torch::Tensor& t = *padding;
  require(t.scalar_type() == torch::kInt64 && t.dim() == 1 && t.size(0) == batch, op, [&] {
    return "padding must be int64 of shape [" + std::to_string(batch) +
           "] (leading padding rows per sequence), got " + dtype_str(t) + " of shape " +
           shape_str(t);
  });
  check_device(op, "padding", t, device);
  return t.contiguous();
}

// Whether a and b are views whose rows (their contiguous last dimension) interleave without
// touching, as the two halves of a [..., 2 * head_dim] K/V block do. Every other stride of both
// is a multiple of a period P, so a's elements sit at A + kP + t (t < a's row length) and b's
// at B + k'P + u: they meet only if t - u = B - A (mod P), which no t, u allow when b's row
// starts, modulo P, in the gap after a's row and ends before a's next row.
bool rows_interleave(const torch::Tensor& a, const torch::Tensor& b) {
  if (a.scalar_type() != b.scalar_type() || a.dim() == 0 || b.dim() == 0 || a.stride(-1) != 1 ||
      b.stride(-1) != 1) {
    return false;
  }
  int64_t period = 0;
  for (const torch::Tensor* t : {&a, &b}) {
    for (int64_t d = 0; d + 1 < t->dim(); ++d) {
      if (t->size(d) > 1) period = std::gcd(period, std::abs(t->stride(d)));
    }
  }
  const auto distance = reinterpret_cast<intptr_t>(b.data_ptr()) - reinterpret_cast<intptr_t>(a.data_ptr());
  if (period == 0 || distance % static_cast<intptr_t>(a.element_size()) != 0) return false;
  const int64_t start = ((distance / static_cast<intptr_t>(a.element_size())) % period + period) % period;
  return start >= a.size(-1) && period - start >= b.size(-1);
}

// Whether a and b may share an element. at::get_overlap_status answers only for contiguous
// tensors (TooHard otherwise, e.g. the per-head views of a cache with 2 KV heads); for those,
// the byte ranges they span are compared, and views whose ranges cross are taken to share
// memory unless their rows interleave (rows_interleave). Other disjoint layouts may be refused:
// a clear error, never a silently wrong write.
bool may_share_memory(const torch::Tensor& a, const torch::Tensor& b) {
  const auto status = at::get_overlap_status(a, b);
  if (status == at::MemOverlapStatus::Full || status == at::MemOverlapStatus::Partial) return true;
  if (status != at::MemOverlapStatus::TooHard) return false;
  if (a.numel() == 0 || b.numel() == 0 || !a.has_storage() || !b.has_storage() ||
      !a.storage().is_alias_of(b.storage())) {
    return false;
  }
  const auto span = [](const torch::Tensor& t) {
    const auto base = reinterpret_cast<uintptr_t>(t.data_ptr());
    int64_t low = 0, high = 0;  // element offsets of the first and last element reached
    for (int64_t d = 0; d < t.dim(); ++d) {
      const int64_t reach = (t.size(d) - 1) * t.stride(d);
      (reach < 0 ? low : high) += reach;
    }
    const auto bytes = static_cast<int64_t>(t.element_size());
    return std::pair<uintptr_t, uintptr_t>(base + low * bytes, base + (high + 1) * bytes);
  };
  const auto [a_low, a_high] = span(a);
  const auto [b_low, b_high] = span(b);
  if (!(a_low < b_high && b_low < a_high)) return false;
  return !rows_interleave(a, b);
}

// A tensor written in place must own each of its elements (an expanded, stride-0 tensor
// would have one write land on many elements) and share no memory with the other tensors
// of the call (a cache whose k and v are one tensor, or new keys read from the cache itself).
void check_writable(const char* op, const char* name, const torch::Tensor& t,
                    std::initializer_list<Named> others) {
  require(at::has_internal_overlap(t) != at::MemOverlap::Yes, op, [&] {
    return std::string(name) +
           " must not have overlapping elements (it is written in place), got an expanded "
           "(stride-0) tensor of shape " + shape_str(t);
  });
  for (const auto& [other_name, other] : others) {
    require(!may_share_memory(t, other), op, [&] {
      return std::string(name) + " must not share memory with " + other_name +
             " (it is written in place): give each its own tensor";
    });
  }
}

}  // namespace

void check_status(const char* op, const lminf::Status& status) {
  if (!status.ok()) fail(op, status.message());
}

AttentionInputs make_attention_inputs(const char* op, const torch::Tensor& q,
                                      const torch::Tensor& k, const torch::Tensor& v,
                                      const torch::Tensor& cache_k, const torch::Tensor& cache_v,
                                      const torch::Tensor& cache_positions,
                                      const torch::Tensor& query_start,
                                      const torch::Tensor& inv_freq, int64_t n_global,
                                      int64_t n_local, int64_t distance_cap, double scale,
                                      const std::optional<torch::Tensor>& padding) {
  check_4d(op, "q", q, "[batch, heads_q, seq, head_dim]");
  check_4d(op, "k", k, "[batch, heads_kv, seq, head_dim]");
  check_4d(op, "v", v, "[batch, heads_kv, seq, head_dim]");
  check_4d(op, "cache_k", cache_k, "[batch, heads_kv, slots, head_dim]");
  check_4d(op, "cache_v", cache_v, "[batch, heads_kv, slots, head_dim]");
  const lminf::DType dtype = to_core_dtype(op, "q", q);
  for (const auto& [name, t] : {Named{"k", k}, {"v", v}, {"cache_k", cache_k}, {"cache_v", cache_v}})
    check_like(op, name, t, q, "q");

  const int64_t batch = q.size(0), heads_q = q.size(1), seq = q.size(2), head_dim = q.size(3);
  const int64_t heads_kv = k.size(1), slots = cache_k.size(2);
  require(heads_kv >= 1 && heads_q % heads_kv == 0, op, [&] {
    return "q's heads (" + std::to_string(heads_q) + ") must be a multiple of k's heads (" +
           std::to_string(heads_kv) + ")";
  });
  check_dim(op, "k", k, 0, batch, "q.size(0), the batch");
  check_dim(op, "k", k, 2, seq, "q.size(2), the sequence length");
  check_dim(op, "k", k, 3, head_dim, "q.size(3), head_dim");
  check_same_shape(op, "v", v, "k", k);
  check_dim(op, "cache_k", cache_k, 0, batch, "q.size(0), the batch");
  check_dim(op, "cache_k", cache_k, 1, heads_kv, "k.size(1), heads_kv");
  check_dim(op, "cache_k", cache_k, 3, head_dim, "q.size(3), head_dim");
  check_same_shape(op, "cache_v", cache_v, "cache_k", cache_k);
  Strided positions =
      slot_positions(op, "cache_positions", cache_positions, batch, slots, q.device(),
                     "one per cache slot");
  Strided starts = sequence_starts(op, "query_start", query_start, batch, q.device());
  require(inv_freq.dim() == 1 && inv_freq.is_floating_point(), op, [&] {
    return "inv_freq must be a 1-D float tensor [rotary_dim / 2], got " + dtype_str(inv_freq) +
           " of shape " + shape_str(inv_freq);
  });
  require(2 * inv_freq.size(0) <= head_dim, op, [&] {
    return "inv_freq has " + std::to_string(inv_freq.size(0)) +
           " frequencies; at most head_dim / 2 = " + std::to_string(head_dim / 2) + " are allowed";
  });
  require(inv_freq.device() == q.device(), op, [&] {
    return "inv_freq must be on " + device_str(q) + ", got " + device_str(inv_freq);
  });

  AttentionInputs in;
  in.q = rows_contiguous(q);
  in.k = rows_contiguous(k);
  in.v = rows_contiguous(v);
  in.cache_k = rows_contiguous(cache_k);
  in.cache_v = rows_contiguous(cache_v);
  in.cache_positions = positions.tensor;
  in.query_start = starts.tensor;
  in.padding = padding_rows(op, padding, batch, q.device());
  in.inv_freq = inv_freq.to(torch::kFloat32).contiguous();
  in.out = torch::empty({batch, heads_q, seq, head_dim}, q.options());

  lminf::LambdaAttentionParams& p = in.params;
  p.dtype = dtype;
  p.q = strided_view<const void>(in.q);
  p.k = strided_view<const void>(in.k);
  p.v = strided_view<const void>(in.v);
  p.cache_k = strided_view<const void>(in.cache_k);
  p.cache_v = strided_view<const void>(in.cache_v);
  p.cache_positions = positions.view<const int64_t>();
  p.cache_len = slots;
  p.query_start = starts.view<const int64_t>();
  p.padding = in.padding.defined() ? in.padding.data_ptr<int64_t>() : nullptr;
  p.out = strided_view<void>(in.out);
  p.inv_freq = in.inv_freq.data_ptr<float>();
  p.rotary_dim = 2 * in.inv_freq.size(0);
  p.batch = batch, p.n_heads_q = heads_q, p.n_heads_kv = heads_kv;
  p.n_queries = seq, p.head_dim = head_dim;
  p.n_global = n_global, p.n_local = n_local, p.distance_cap = distance_cap;
  // A double outside float's range would become inf here: validate() sees the float the
  // kernels use.
  p.scale = static_cast<float>(scale);
  return in;
}

void attach_middle_store(const char* op, AttentionInputs& in, const torch::Tensor& middle_k,
                         const torch::Tensor& middle_v, const torch::Tensor& middle_positions,
                         int64_t top_k, int64_t top_k_distance, int64_t top_k_first_row) {
  const torch::Tensor& q = in.q;
  check_4d(op, "middle_k", middle_k, "[batch, heads_kv, slots, head_dim]");
  check_like(op, "middle_k", middle_k, q, "q");
  check_like(op, "middle_v", middle_v, q, "q");
  check_dim(op, "middle_k", middle_k, 0, q.size(0), "q.size(0), the batch");
  check_dim(op, "middle_k", middle_k, 1, in.k.size(1), "k.size(1), heads_kv");
  check_dim(op, "middle_k", middle_k, 3, q.size(3), "q.size(3), head_dim");
  check_same_shape(op, "middle_v", middle_v, "middle_k", middle_k);
  const int64_t slots = middle_k.size(2);
  Strided positions = slot_positions(op, "middle_positions", middle_positions, q.size(0), slots,
                                     q.device(), "one per middle slot");
  in.middle_k = rows_contiguous(middle_k);
  in.middle_v = rows_contiguous(middle_v);
  in.middle_positions = positions.tensor;
  lminf::TopKMiddleParams& m = in.top_k;
  m.middle_k = strided_view<const void>(in.middle_k);
  m.middle_v = strided_view<const void>(in.middle_v);
  m.middle_positions = positions.view<const int64_t>();
  m.middle_len = slots;
  m.top_k = top_k, m.top_k_distance = top_k_distance, m.top_k_first_row = top_k_first_row;
}

AppendInputs make_append_inputs(const torch::Tensor& cache_k, const torch::Tensor& cache_v,
                                const torch::Tensor& cache_positions, const torch::Tensor& k,
                                const torch::Tensor& v, const torch::Tensor& start_position,
                                int64_t n_global, int64_t n_local,
                                const std::optional<torch::Tensor>& padding) {
  const char* op = "lminf::ring_cache_append";
  check_4d(op, "cache_k", cache_k, "[batch, heads_kv, n_global + n_local, head_dim]");
  check_4d(op, "k", k, "[batch, heads_kv, seq, head_dim]");
  const lminf::DType dtype = to_core_dtype(op, "cache_k", cache_k);
  for (const auto& [name, t] : {Named{"cache_v", cache_v}, {"k", k}, {"v", v}})
    check_like(op, name, t, cache_k, "cache_k");
  check_same_shape(op, "cache_v", cache_v, "cache_k", cache_k);
  check_dim(op, "k", k, 0, cache_k.size(0), "cache_k.size(0), the batch");
  check_dim(op, "k", k, 1, cache_k.size(1), "cache_k.size(1), heads_kv");
  check_dim(op, "k", k, 3, cache_k.size(3), "cache_k.size(3), head_dim");
  check_same_shape(op, "v", v, "k", k);
  // The cache is written in place, so it cannot be silently copied or aliased.
  for (const auto& [name, t] : {Named{"cache_k", cache_k}, {"cache_v", cache_v}})
    require(t.stride(-1) == 1 || t.size(-1) <= 1, op, [&] {
      return std::string(name) + " must have a contiguous last dimension (it is written in place)";
    });
  const int64_t batch = cache_k.size(0);
  const Strided positions = slot_positions(op, "cache_positions", cache_positions, batch,
                                           cache_k.size(2), cache_k.device(), "one per cache slot");
  require(cache_positions.is_contiguous(), op, [] {
    return std::string("cache_positions must be contiguous (it is written in place)");
  });
  check_writable(op, "cache_k", cache_k,
                 {{"cache_v", cache_v}, {"cache_positions", cache_positions}, {"k", k}, {"v", v}});
  check_writable(op, "cache_v", cache_v, {{"cache_positions", cache_positions}, {"k", k}, {"v", v}});
  const torch::Tensor no_padding;
  const torch::Tensor& padding_or_none = padding ? *padding : no_padding;
  if (padding)
    check_writable(op, "cache_positions", cache_positions,
                   {{"k", k}, {"v", v}, {"start_position", start_position},
                    {"padding", padding_or_none}});
  else
    check_writable(op, "cache_positions", cache_positions,
                   {{"k", k}, {"v", v}, {"start_position", start_position}});
  const Strided starts =
      sequence_starts(op, "start_position", start_position, batch, cache_k.device());
  require(batch <= 1 || positions.batch_stride != 0 || (starts.batch_stride == 0 && !padding), op,
          [&] {
            return "cache_positions must be [" + std::to_string(batch) + ", " +
                   std::to_string(cache_k.size(2)) +
                   "] (one row per sequence) when start_position is per sequence or padding is "
                   "given, got shape " + shape_str(cache_positions);
          });

  AppendInputs in;
  in.k = rows_contiguous(k);
  in.v = rows_contiguous(v);
  in.start_position = starts.tensor;
  in.padding = padding_rows(op, padding, batch, cache_k.device());
  lminf::RingCacheAppendParams& p = in.params;
  p.dtype = dtype;
  p.cache_k = strided_view<void>(cache_k);
  p.cache_v = strided_view<void>(cache_v);
  p.cache_positions = {cache_positions.data_ptr<int64_t>(), positions.batch_stride};
  p.k = strided_view<const void>(in.k);
  p.v = strided_view<const void>(in.v);
  p.start_position = starts.view<const int64_t>();
  p.padding = in.padding.defined() ? in.padding.data_ptr<int64_t>() : nullptr;
  p.batch = k.size(0), p.n_heads_kv = k.size(1), p.n_new = k.size(2), p.head_dim = k.size(3);
  p.n_global = n_global, p.n_local = n_local;
  // The slot count is the one size the params do not carry; it needs n_global + n_local,
  // which is only defined once the core has checked both (and that the sum fits in int64).
  check_status(op, lminf::validate(p));
  check_dim(op, "cache_k", cache_k, 2, n_global + n_local, "n_global + n_local");
  return in;
}

LinearInputs make_linear_inputs(const char* op, const torch::Tensor& x, const torch::Tensor& weight,
                                const std::optional<torch::Tensor>& bias) {
  require(weight.dim() == 2, op, [&] {
    return "weight must be 2-D [out_features, in_features], got shape " + shape_str(weight);
  });
  require(x.dim() >= 1, op, [&] { return std::string("x must have at least one dimension, got a scalar"); });
  const lminf::DType dtype = to_core_dtype(op, "weight", weight);
  check_like(op, "x", x, weight, "weight");
  const int64_t out_features = weight.size(0), in_features = weight.size(1);
  check_dim(op, "x", x, -1, in_features, "weight.size(1), in_features");
  LinearInputs in;
  if (bias) {
    check_like(op, "bias", *bias, weight, "weight");
    require(bias->dim() == 1 && bias->size(0) == out_features, op, [&] {
      return "bias must be 1-D [out_features] = [" + std::to_string(out_features) +
             "], got shape " + shape_str(*bias);
    });
    in.bias = bias->contiguous();
  }
  in.out_shape = x.sizes().vec();
  in.out_shape.back() = out_features;
  int64_t rows = 1;  // x's leading dimensions flattened (not -1: in_features may be 0)
  for (int64_t d = 0; d + 1 < x.dim(); ++d) rows *= x.size(d);
  // The kernel reads whole rows: rows that overlap (an expanded tensor) are copied apart.
  const auto separate_rows = [](const torch::Tensor& t) {
    const torch::Tensor r = rows_contiguous(t);
    return r.size(0) > 1 && r.stride(0) < r.size(1) ? r.contiguous() : r;
  };
  in.x = separate_rows(x.reshape({rows, in_features}));
  in.weight = separate_rows(weight);
  in.out = torch::empty({in.x.size(0), out_features}, weight.options());

  lminf::DecodeLinearParams& p = in.params;
  p.dtype = dtype;
  // One row (or one output feature) has no row stride to speak of: torch may report any
  // (out is allocated contiguous: its row stride is out_features already).
  const auto rows_of = [](const torch::Tensor& t, bool one_row, int64_t length) {
    return lminf::RowsView<const void>{t.data_ptr(), one_row ? length : t.stride(0)};
  };
  p.x = rows_of(in.x, in.x.size(0) <= 1, in_features);
  p.weight = rows_of(in.weight, out_features <= 1, in_features);
  p.bias = in.bias.defined() ? in.bias.data_ptr() : nullptr;
  p.out = {in.out.data_ptr(), in.out.stride(0)};
  p.rows = in.x.size(0), p.in_features = in_features, p.out_features = out_features;
  return in;
}

}  // namespace lminf_ext
