#include "parallel/mpi_check.h"

#include <fmt/format.h>

#include "runtime/error.h"

namespace moeforge::detail {

void mpi_failed(const char* statement, int code, const char* file, int line) {
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  if (MPI_Error_string(code, text, &length) != MPI_SUCCESS) length = 0;
  throw Error(fmt::format("{} failed at {}:{}: {} (MPI error {})", statement, file, line,
                          length ? std::string(text, length) : std::string("unknown error"), code),
              fmt::format("{}:{}", file, line));
}

}  // namespace moeforge::detail
