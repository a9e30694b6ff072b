// MpiRuntime: MPI for the lifetime of one object (one per process, made by the launcher).
//
// The constructor initialises MPI with MPI_THREAD_MULTIPLE, because the watchdog's service
// thread calls MPI while the training thread is inside a collective, sets MPI_COMM_WORLD (and so
// every communicator split from it) to return errors to MOE_MPI_CHECK instead of aborting inside
// MPI, and starts the watchdog. Without mpirun the process is an MPI singleton (world size 1).
//
// The destructor stops the watchdog and calls MPI_Finalize, which waits for every rank: every
// Comm (every ProcessGrid) must be gone by then, and a rank that fails must call abort() rather
// than return, or the other ranks wait for it until their collectives time out.
#pragma once

#include <memory>
#include <string>

#include "parallel/mpi_check.h"
#include "parallel/watchdog.h"

namespace moeforge {

class MpiRuntime {
 public:
  MpiRuntime();
  ~MpiRuntime();
  MpiRuntime(const MpiRuntime&) = delete;
  MpiRuntime& operator=(const MpiRuntime&) = delete;

  int world_rank() const { return world_rank_; }
  int world_size() const { return world_size_; }
  const std::shared_ptr<Watchdog>& watchdog() const { return watchdog_; }

  // Prints "moeforge: rank R: <message>" to stderr once and aborts the whole job with `code`
  // (MPI_Abort on MPI_COMM_WORLD).
  [[noreturn]] void abort(int code, const std::string& message) const;

 private:
  int world_rank_ = 0;
  int world_size_ = 1;
  std::shared_ptr<Watchdog> watchdog_;
};

}  // namespace moeforge
