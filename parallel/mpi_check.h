// MOE_MPI_CHECK: the one way to call MPI. Every communicator moeforge uses returns errors
// (MPI_ERRORS_RETURN) instead of aborting inside MPI, and a failed call throws moeforge::Error
// naming the statement, MPI's error string and the source location:
//   MOE_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, p, n, MPI_FLOAT, MPI_SUM, comm));
#pragma once

#include <mpi.h>

namespace moeforge::detail {
[[noreturn]] void mpi_failed(const char* statement, int code, const char* file, int line);
}  // namespace moeforge::detail

#define MOE_MPI_CHECK(stmt)                                                   \
  do {                                                                        \
    const int moe_mpi_rc_ = (stmt);                                           \
    if (moe_mpi_rc_ != MPI_SUCCESS) [[unlikely]] {                            \
      ::moeforge::detail::mpi_failed(#stmt, moe_mpi_rc_, __FILE__, __LINE__); \
    }                                                                         \
  } while (0)
