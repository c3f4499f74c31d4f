#include "checks.h"

namespace lminf_ext {

std::string shape_str(const torch::Tensor& t) {
  std::string text = "[";
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (d > 0) text += ", ";
    text += std::to_string(t.size(d));
  }
  return text + "]";
}

std::string dtype_str(torch::ScalarType type) { return c10::toString(type); }
std::string dtype_str(const torch::Tensor& t) { return dtype_str(t.scalar_type()); }

std::string device_str(const torch::Device& device) {
  std::string text = c10::DeviceTypeName(device.type(), /*lower_case=*/true);
  if (device.has_index()) text += ":" + std::to_string(device.index());
  return text;
}
std::string device_str(const torch::Tensor& t) { return device_str(t.device()); }

void fail(const char* op, const std::string& message) {
  const std::string text = std::string(op) + ": " + message;
  TORCH_CHECK(false, text.c_str());
}

}  // namespace lminf_ext
