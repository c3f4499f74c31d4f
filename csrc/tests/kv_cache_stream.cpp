// Runs lminf::KVCache over a stream read from files, for tests in other languages that check
// the C++ API against their own implementation (tests/test_cpp_python_agree.py).
//
//   kv_cache_stream DIR
//
// DIR/config.txt holds "key value..." lines: dtype (float32, bfloat16 or float16), batch,
// n_heads_q, n_heads_kv, head_dim, rotary_dim, n_global, n_local, distance_cap, scale,
// n_tokens, and chunks (the chunk sizes, fed in order; 1 = a decode step); optionally padding,
// batch values per chunk (a ragged batch: each chunk's leading padding rows per sequence).
// DIR/q.f32 [batch, n_heads_q, n_tokens, head_dim], DIR/k.f32 and DIR/v.f32 [batch, n_heads_kv,
// n_tokens, head_dim] and DIR/inv_freq.f32 [rotary_dim / 2] are raw float32 (native byte
// order); q, k, v are rounded to dtype. Writes the attention output, as float32 shaped like q,
// to DIR/out.f32.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "host_tensor.h"
#include "lminf/kv_cache.h"

using lminf_test::HostTensor;

namespace {

std::vector<float> read_floats(const std::string& path, size_t count) {
  std::vector<float> values(count);
  std::ifstream file(path, std::ios::binary);
  file.read(reinterpret_cast<char*>(values.data()),
            static_cast<std::streamsize>(count * sizeof(float)));
  if (!file || file.peek() != EOF) {
    std::fprintf(stderr, "%s: expected exactly %zu float32 values\n", path.c_str(), count);
    std::exit(2);
  }
  return values;
}

int fail(const char* what, const lminf::Status& status) {
  std::fprintf(stderr, "%s: %s\n", what, status.message().c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s DIR\n", argv[0]);
    return 2;
  }
  const std::string dir = argv[1];
  std::map<std::string, std::string> config;
  std::vector<int64_t> chunks, padding;
  std::ifstream config_file(dir + "/config.txt");
  for (std::string line; std::getline(config_file, line);) {
    std::istringstream fields(line);
    std::string key;
    fields >> key;
    if (key == "chunks") {
      for (int64_t n; fields >> n;) chunks.push_back(n);
    } else if (key == "padding") {
      for (int64_t n; fields >> n;) padding.push_back(n);
    } else {
      fields >> config[key];
    }
  }
  const auto integer = [&](const char* key) { return std::stoll(config.at(key)); };
  const std::map<std::string, lminf::DType> dtypes = {{"float32", lminf::DType::kFloat32},
                                                      {"bfloat16", lminf::DType::kBFloat16},
                                                      {"float16", lminf::DType::kFloat16}};

  lminf::KVCacheShape shape;
  shape.dtype = dtypes.at(config.at("dtype"));
  shape.batch = integer("batch");
  shape.n_heads_kv = integer("n_heads_kv");
  shape.head_dim = integer("head_dim");
  shape.n_global = integer("n_global");
  shape.n_local = integer("n_local");
  const int64_t n_heads_q = integer("n_heads_q"), n_tokens = integer("n_tokens");
  const size_t d = shape.head_dim, t = n_tokens;
  const size_t q_rows = shape.batch * n_heads_q, kv_rows = shape.batch * shape.n_heads_kv;

  const std::vector<float> inv_freq = read_floats(dir + "/inv_freq.f32", integer("rotary_dim") / 2);
  const HostTensor q(shape.dtype, read_floats(dir + "/q.f32", q_rows * t * d));
  const HostTensor k(shape.dtype, read_floats(dir + "/k.f32", kv_rows * t * d));
  const HostTensor v(shape.dtype, read_floats(dir + "/v.f32", kv_rows * t * d));

  lminf::AttentionConfig attention;
  attention.n_heads_q = n_heads_q;
  attention.inv_freq = inv_freq.data();
  attention.rotary_dim = integer("rotary_dim");
  attention.distance_cap = integer("distance_cap");
  attention.scale = std::stof(config.at("scale"));

  lminf::KVCache cache;
  if (lminf::Status s = lminf::KVCache::allocate(shape, lminf::MemoryKind::kHost, &cache);
      !s.ok()) {
    return fail("allocate", s);
  }
  if (!padding.empty() && padding.size() != chunks.size() * static_cast<size_t>(shape.batch)) {
    std::fprintf(stderr, "padding has %zu values, expected batch x chunks = %zu\n",
                 padding.size(), chunks.size() * static_cast<size_t>(shape.batch));
    return 2;
  }
  HostTensor out(shape.dtype, q.size());
  size_t begin = 0;
  for (size_t i = 0; i < chunks.size(); ++i) {
    const int64_t n = chunks[i];
    const int64_t* chunk_padding = padding.empty() ? nullptr : padding.data() + i * shape.batch;
    const HostTensor cq = q.slice(q_rows, t, begin, n, d);
    const HostTensor ck = k.slice(kv_rows, t, begin, n, d);
    const HostTensor cv = v.slice(kv_rows, t, begin, n, d);
    HostTensor chunk_out(shape.dtype, cq.size());
    const lminf::Status s =
        n == 1 && chunk_padding == nullptr
            ? cache.decode(attention, cq.data(), ck.data(), cv.data(), chunk_out.data())
            : cache.attend_and_append(attention, cq.data(), ck.data(), cv.data(), n,
                                      chunk_out.data(), {}, chunk_padding);
    if (!s.ok()) return fail("attention", s);
    out.assign_slice(chunk_out, q_rows, t, begin, n, d);
    begin += n;
  }
  if (begin != t) {
    std::fprintf(stderr, "chunks add up to %zu tokens, n_tokens is %zu\n", begin, t);
    return 2;
  }

  const std::vector<double> result = out.to_double();
  const std::vector<float> as_float(result.begin(), result.end());
  std::ofstream(dir + "/out.f32", std::ios::binary)
      .write(reinterpret_cast<const char*>(as_float.data()),
             static_cast<std::streamsize>(as_float.size() * sizeof(float)));
  return 0;
}
