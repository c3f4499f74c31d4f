// How the torch glue reports a bad argument: one helper that raises, messages built without
// std::ostream.
//
// On the GPU machine's build, every TORCH_CHECK whose message formatted a number through
// c10::str segfaulted inside std::ostream::_M_insert<long>, resolved inside _C.so itself
// (csrc/cuda/NOTES.md). Whatever the toolchain cause, the error path needs no streams:
// messages are std::strings built with std::to_string, and fail() hands TORCH_CHECK a single
// C string, which c10 passes through untouched. The Python exception stays RuntimeError.
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <string>

namespace lminf_ext {

std::string shape_str(const torch::Tensor& t);  // "[2, 3, 5]"
std::string dtype_str(const torch::Tensor& t);  // "Float", as torch prints a ScalarType
std::string device_str(const torch::Tensor& t);  // "cpu", "cuda:0"
std::string dtype_str(torch::ScalarType type);
std::string device_str(const torch::Device& device);

// Raises c10::Error (Python: RuntimeError) with "op: message".
[[noreturn]] void fail(const char* op, const std::string& message);

// fail(op, message()) unless ok. The message is a callable so that it is only built on
// failure: these checks run for every layer of every decode step.
template <typename Message>
inline void require(bool ok, const char* op, const Message& message) {
  if (!ok) [[unlikely]] fail(op, message());
}

}  // namespace lminf_ext
