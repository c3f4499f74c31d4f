#include "naive_attention.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace lminf_test {
namespace {

// R_p x in rotate_half convention: each pair (x[f], x[f + half]) turns by p * inv_freq[f].
std::vector<double> rotate(const double* x, int64_t p, const NaiveAttentionProblem& pr) {
  std::vector<double> r(x, x + pr.head_dim);
  const int64_t half = pr.rotary_dim / 2;
  for (int64_t f = 0; f < half; ++f) {
    const double angle = static_cast<double>(p) * pr.inv_freq[f];
    const double c = std::cos(angle), s = std::sin(angle);
    r[f] = x[f] * c - x[f + half] * s;
    r[f + half] = x[f + half] * c + x[f] * s;
  }
  return r;
}

}  // namespace

std::vector<double> naive_lambda_attention(const NaiveAttentionProblem& pr) {
  const int64_t n_queries = static_cast<int64_t>(pr.query_positions.size());
  const int64_t n_keys = static_cast<int64_t>(pr.key_positions.size());
  const int64_t d = pr.head_dim, group = pr.n_heads_q / pr.n_heads_kv;
  std::vector<double> out(pr.batch * pr.n_heads_q * n_queries * d, 0.0);

  for (int64_t b = 0; b < pr.batch; ++b) {
    for (int64_t h = 0; h < pr.n_heads_q; ++h) {
      const int64_t kv_head = h / group;
      const double* keys = pr.k.data() + (b * pr.n_heads_kv + kv_head) * n_keys * d;
      const double* values = pr.v.data() + (b * pr.n_heads_kv + kv_head) * n_keys * d;
      for (int64_t i = 0; i < n_queries; ++i) {
        const double* query = pr.q.data() + ((b * pr.n_heads_q + h) * n_queries + i) * d;
        const int64_t qpos = pr.query_positions[i];
        // Score of every visible key. Since rotations are orthogonal and compose by adding
        // angles, (R_i q) . (R_j k) = (R_{i-j} q) . k: a local key needs q turned by the
        // distance, a global key beyond the window q turned by distance_cap.
        std::vector<double> scores(n_keys, -std::numeric_limits<double>::infinity());
        double max_score = -std::numeric_limits<double>::infinity();
        for (int64_t j = 0; j < n_keys; ++j) {
          const int64_t kpos = pr.key_positions[j];
          if (kpos < 0 || kpos > qpos) continue;
          const int64_t distance = qpos - kpos;
          int64_t turn;
          if (distance < pr.n_local) {
            turn = distance;
          } else if (kpos < pr.n_global) {
            turn = pr.distance_cap;
          } else {
            continue;
          }
          const std::vector<double> turned = rotate(query, turn, pr);
          double dot = 0.0;
          for (int64_t f = 0; f < d; ++f) dot += turned[f] * keys[j * d + f];
          scores[j] = pr.scale * dot;
          max_score = std::max(max_score, scores[j]);
        }
        if (max_score == -std::numeric_limits<double>::infinity()) continue;
        double total = 0.0;
        double* row = out.data() + ((b * pr.n_heads_q + h) * n_queries + i) * d;
        for (int64_t j = 0; j < n_keys; ++j) {
          if (scores[j] == -std::numeric_limits<double>::infinity()) continue;
          const double weight = std::exp(scores[j] - max_score);
          total += weight;
          for (int64_t f = 0; f < d; ++f) row[f] += weight * values[j * d + f];
        }
        for (int64_t f = 0; f < d; ++f) row[f] /= total;
      }
    }
  }
  return out;
}

}  // namespace lminf_test
