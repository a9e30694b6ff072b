#include "runtime/error.h"

namespace moeforge::detail {

void check_failed(const char* file, int line, std::string message) {
  throw Error(std::move(message), fmt::format("{}:{}", file, line));
}

}  // namespace moeforge::detail
