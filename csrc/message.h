// Error messages of the core, concatenated from strings and numbers without std::ostream
// (the torch extension links this code; see lminf_ext/checks.h for why streams are avoided).
#pragma once

#include <cstdint>
#include <string>
#include <type_traits>

#include "lminf/status.h"

namespace lminf::detail {

inline std::string to_text(const char* s) { return s; }
inline std::string to_text(const std::string& s) { return s; }
template <typename T, typename = std::enable_if_t<std::is_arithmetic_v<T>>>
std::string to_text(T value) {
  return std::to_string(value);
}

template <typename... Parts>
std::string concat(const Parts&... parts) {
  std::string text;
  ((text += to_text(parts)), ...);
  return text;
}

template <typename... Parts>
Status invalid(const Parts&... parts) {
  return Status::InvalidArgument(concat(parts...));
}

}  // namespace lminf::detail
