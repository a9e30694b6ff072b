// Errors. Library code never exits: it throws moeforge::Error with a message that says what was
// expected, what was found and where. Only launch/ decides how to report it and which exit code
// to use. MOE_CHECK is the one way to state a precondition:
//
//   MOE_CHECK(x.ndim() == 2, "rmsnorm_fwd: x must be 2-D, got shape {}", x.shape().str());
//
// The message is formatted with fmt only when the check fails. The source location is kept
// separately (Error::where()) so user-facing messages stay clean.
#pragma once

#include <fmt/format.h>

#include <stdexcept>
#include <string>

namespace moeforge {

class Error : public std::runtime_error {
 public:
  Error(const std::string& message, std::string where = {})
      : std::runtime_error(message), where_(std::move(where)) {}
  // "file:line" of the check that failed, empty when thrown directly.
  const std::string& where() const { return where_; }

 private:
  std::string where_;
};

namespace detail {
[[noreturn]] void check_failed(const char* file, int line, std::string message);
}  // namespace detail

}  // namespace moeforge

#define MOE_CHECK(cond, ...)                                                              \
  do {                                                                                    \
    if (!(cond)) [[unlikely]] {                                                           \
      ::moeforge::detail::check_failed(__FILE__, __LINE__, ::fmt::format(__VA_ARGS__));   \
    }                                                                                     \
  } while (0)

#define MOE_THROW(...) ::moeforge::detail::check_failed(__FILE__, __LINE__, ::fmt::format(__VA_ARGS__))
