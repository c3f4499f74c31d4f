// A minimal test harness: TEST(name) registers a case, CHECK(condition) << "context" records a
// failure without stopping the case, and main() (harness_main.cpp) runs every case and fails
// if any check failed.
// Dependency-free on purpose, so that the C++ tests build wherever the library builds.
#pragma once

#include <cstdio>
#include <functional>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

namespace lminf_test {

struct Case {
  const char* name;
  std::function<void()> body;
};

inline std::vector<Case>& registry() {
  static std::vector<Case> cases;
  return cases;
}

inline int& failures() {
  static int count = 0;
  return count;
}

struct Register {
  Register(const char* name, std::function<void()> body) {
    registry().push_back({name, std::move(body)});
  }
};

// Collects the streamed context of one failed check and prints it when destroyed.
class Failure {
 public:
  Failure(const char* file, int line, const char* expression) {
    ++failures();
    message_ << file << ":" << line << ": CHECK(" << expression << ") failed";
  }
  ~Failure() { std::cerr << message_.str() << "\n"; }
  template <typename T>
  Failure& operator<<(const T& value) {
    message_ << (first_ ? ": " : "") << value;
    first_ = false;
    return *this;
  }

 private:
  std::ostringstream message_;
  bool first_ = true;
};

inline int run_all() {
  for (const Case& c : registry()) {
    const int before = failures();
    c.body();
    std::printf("%s %s\n", failures() == before ? "[ ok ]" : "[FAIL]", c.name);
  }
  std::printf("%zu cases, %d failed checks\n", registry().size(), failures());
  return failures() == 0 ? 0 : 1;
}

}  // namespace lminf_test

#define LMINF_CONCAT_INNER(a, b) a##b
#define LMINF_CONCAT(a, b) LMINF_CONCAT_INNER(a, b)

#define TEST(name)                                                                 \
  static void name();                                                              \
  static const ::lminf_test::Register LMINF_CONCAT(register_, name){#name, &name}; \
  static void name()

#define CHECK(condition) \
  if (condition) {       \
  } else                 \
    ::lminf_test::Failure(__FILE__, __LINE__, #condition)

// Checks that a Status is ok, printing its message otherwise.
#define CHECK_OK(expression)                                                  \
  if (const ::lminf::Status lminf_status = (expression); lminf_status.ok()) { \
  } else                                                                      \
    ::lminf_test::Failure(__FILE__, __LINE__, #expression " is ok") << lminf_status.message()
