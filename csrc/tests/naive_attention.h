// An independent double-precision implementation of docs/design.md section 1, written for clarity
// as a plain loop over every (query, key) pair. The tests hold the library's kernels to it.
#pragma once

#include <cstdint>
#include <vector>

namespace lminf_test {

struct NaiveAttentionProblem {
  int64_t batch = 1, n_heads_q = 1, n_heads_kv = 1, head_dim = 1;
  int64_t rotary_dim = 0;
  int64_t n_global = 0, n_local = 1, distance_cap = 1;
  double scale = 1.0;
  std::vector<double> inv_freq;          // [rotary_dim / 2]
  std::vector<double> q;                 // [batch, n_heads_q, n_queries, head_dim], unrotated
  std::vector<int64_t> query_positions;  // [n_queries]
  std::vector<double> k, v;              // [batch, n_heads_kv, n_keys, head_dim], unrotated
  std::vector<int64_t> key_positions;    // [n_keys]; negative = no key in this slot
};

// [batch, n_heads_q, n_queries, head_dim]; a query that sees no key gets zeros.
std::vector<double> naive_lambda_attention(const NaiveAttentionProblem& problem);

}  // namespace lminf_test
