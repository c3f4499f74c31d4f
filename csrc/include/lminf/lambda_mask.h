// The visibility rule of Λ-shaped attention (lambda_attention.h), written once for the CPU
// kernel and every CUDA kernel. For a query at position i and a key at position j, at distance
// d = i - j:
//   local   0 <= d < n_local                 (the window, scored at distance d)
//   global  j < n_global and d >= n_local    (scored at distance_cap)
//   masked  otherwise: a later key (d < 0), or the middle of the sequence
// and, for the optional top-k variant, the middle keys a query may pick from are the masked
// ones it does not see ahead of it: j >= n_global and d >= n_local.
//
// The tests below depend on positions only through distances, except the global one, which
// also needs j < n_global: so a kernel may count positions from any origin it likes (a tile's
// anchor, a row index of its own key sequence), and passes "the key is global" separately.
// Every function is a template over the integer type, so a kernel that counts rows in int32
// keeps int32 arithmetic; int64 callers pass positions within limits.h's 2^62, so nothing
// here overflows.
//
// Per-tile tests: a block of queries [i_lo, i_hi] and a tile of keys skips the tile when no
// query sees any of its keys (local_keys_of_any, global_keys of the last query), and leaves
// out the per-element mask when every query sees every key locally (local_keys_of_all).
#pragma once

#include "lminf/host_device.h"

namespace lminf {

enum class KeyVisibility : int {
  kMasked = 0,  // not attended
  kLocal = 1,   // in the window: scored at its own distance
  kGlobal = 2,  // a global key beyond the window: scored at distance_cap
};

// Whether a key at `distance` (query position minus key position) is in the query's window.
template <class I>
LMINF_HOST_DEVICE constexpr bool is_local(I distance, I n_local) {
  return distance >= 0 && distance < n_local;
}

// Whether a global key (position < n_global: key_is_global) at `distance` is one the query sees
// beyond its window.
template <class I>
LMINF_HOST_DEVICE constexpr bool is_global(I distance, bool key_is_global, I n_local) {
  return key_is_global && distance >= n_local;
}

// How the query sees a key at `distance`; key_is_global: the key's position is < n_global.
template <class I>
LMINF_HOST_DEVICE constexpr KeyVisibility key_visibility(I distance, bool key_is_global,
                                                         I n_local) {
  return is_local(distance, n_local)                  ? KeyVisibility::kLocal
         : is_global(distance, key_is_global, n_local) ? KeyVisibility::kGlobal
                                                       : KeyVisibility::kMasked;
}

// An inclusive range of key positions (or of key rows) [first, last]; empty when first > last.
template <class I>
struct KeyRange {
  I first;
  I last;

  // Whether the range holds no key.
  LMINF_HOST_DEVICE constexpr bool empty() const { return first > last; }
  // Keys in the range (0 when empty).
  LMINF_HOST_DEVICE constexpr I size() const { return empty() ? I(0) : last - first + 1; }
  // Whether key j lies in the range.
  LMINF_HOST_DEVICE constexpr bool contains(I j) const { return j >= first && j <= last; }
  // Whether every key of [lo, hi] lies in the range.
  LMINF_HOST_DEVICE constexpr bool contains(I lo, I hi) const { return lo >= first && hi <= last; }
  // Whether some key of [lo, hi] (lo <= hi) lies in the range.
  LMINF_HOST_DEVICE constexpr bool overlaps(I lo, I hi) const { return lo <= last && hi >= first; }
};

// The keys the query at position i sees locally: [i - n_local + 1, i].
template <class I>
LMINF_HOST_DEVICE constexpr KeyRange<I> local_keys(I i, I n_local) {
  return {i - n_local + 1, i};
}

// The keys every query of [i_lo, i_hi] sees locally: [i_hi - n_local + 1, i_lo] (empty once the
// queries span n_local positions or more). A tile inside it needs no per-element mask.
template <class I>
LMINF_HOST_DEVICE constexpr KeyRange<I> local_keys_of_all(I i_lo, I i_hi, I n_local) {
  return {i_hi - n_local + 1, i_lo};
}

// The keys some query of [i_lo, i_hi] sees locally: [i_lo - n_local + 1, i_hi]. A tile outside
// it holds no local key of any of them.
template <class I>
LMINF_HOST_DEVICE constexpr KeyRange<I> local_keys_of_any(I i_lo, I i_hi, I n_local) {
  return {i_lo - n_local + 1, i_hi};
}

// The global keys the query at position i (an absolute position here) sees beyond its window:
// positions [0, min(n_global, i - n_local + 1)). A later query sees all of an earlier one's,
// so the first query of a block gives the keys every query sees, the last those any sees.
template <class I>
LMINF_HOST_DEVICE constexpr KeyRange<I> global_keys(I i, I n_global, I n_local) {
  return {0, n_global - 1 < i - n_local ? n_global - 1 : i - n_local};
}

// The top-k middle candidates of the query at position i (absolute): the keys the mask hides
// that are not ahead of it, positions [n_global, i - n_local].
template <class I>
LMINF_HOST_DEVICE constexpr KeyRange<I> middle_keys(I i, I n_global, I n_local) {
  return {n_global, i - n_local};
}

}  // namespace lminf
