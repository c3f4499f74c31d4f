// Error reporting for the lminf core: every entry point returns a Status and never throws.
#pragma once

#include <string>
#include <utility>

namespace lminf {

enum class StatusCode : int {
  kOk = 0,
  kInvalidArgument = 1,  // an argument is out of range or inconsistent; the message names it
  kUnsupported = 2,      // valid, but not built or not implemented (e.g. CUDA in a CPU build)
  kOutOfMemory = 3,
  kCudaError = 4,        // a CUDA runtime call or kernel launch failed
};

// A code plus a human-readable message that names the offending argument.
class Status {
 public:
  Status() = default;
  Status(StatusCode code, std::string message) : code_(code), message_(std::move(message)) {}

  static Status Ok() { return {}; }
  static Status InvalidArgument(std::string message) {
    return {StatusCode::kInvalidArgument, std::move(message)};
  }
  static Status Unsupported(std::string message) {
    return {StatusCode::kUnsupported, std::move(message)};
  }
  static Status OutOfMemory(std::string message) {
    return {StatusCode::kOutOfMemory, std::move(message)};
  }

  bool ok() const { return code_ == StatusCode::kOk; }
  StatusCode code() const { return code_; }
  const std::string& message() const { return message_; }

 private:
  StatusCode code_ = StatusCode::kOk;
  std::string message_;
};

}  // namespace lminf
