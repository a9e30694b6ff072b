// Multi-rank gtest support: every test executable in this folder runs under mpirun with the
// main in mpi_test_main.cpp, which initialises MPI once for the process (MpiRuntime), prints the
// full gtest report on rank 0 and failures only (prefixed with the rank) on the others, and makes
// every rank exit with the same status.
//
// Every rank runs every test, so a test may use collectives freely; a rank that fails an ASSERT
// and leaves a test early makes the others miss a collective, which the watchdog turns into an
// abort naming the call after kTestTimeoutS rather than a hang.
#pragma once

#include <gtest/gtest.h>

#include "parallel/mpi_runtime.h"

namespace moeforge::testing {

inline constexpr double kTestTimeoutS = 30.0;

// The process's MpiRuntime (lives for the whole of main).
const MpiRuntime& mpi();

}  // namespace moeforge::testing
