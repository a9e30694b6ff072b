#include "parallel/mpi_runtime.h"

#include "runtime/error.h"

namespace moeforge {
namespace {

const char* thread_level_name(int level) {
  switch (level) {
    case MPI_THREAD_SINGLE: return "MPI_THREAD_SINGLE";
    case MPI_THREAD_FUNNELED: return "MPI_THREAD_FUNNELED";
    case MPI_THREAD_SERIALIZED: return "MPI_THREAD_SERIALIZED";
    case MPI_THREAD_MULTIPLE: return "MPI_THREAD_MULTIPLE";
  }
  return "an unknown thread level";
}

}  // namespace

MpiRuntime::MpiRuntime() {
  int initialized = 0;
  MOE_MPI_CHECK(MPI_Initialized(&initialized));
  MOE_CHECK(!initialized, "MpiRuntime: MPI is already initialized in this process (one MpiRuntime per process)");
  int provided = MPI_THREAD_SINGLE;
  MOE_MPI_CHECK(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_MULTIPLE, &provided));
  if (provided < MPI_THREAD_MULTIPLE) {
    MPI_Finalize();
    MOE_THROW(
        "MPI_Init_thread: moeforge needs MPI_THREAD_MULTIPLE (the watchdog calls MPI from its own thread), "
        "but the MPI library provided only {}; use an MPI built with thread support (Open MPI: "
        "--enable-mpi-thread-multiple)",
        thread_level_name(provided));
  }
  MOE_MPI_CHECK(MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN));
  MOE_MPI_CHECK(MPI_Comm_rank(MPI_COMM_WORLD, &world_rank_));
  MOE_MPI_CHECK(MPI_Comm_size(MPI_COMM_WORLD, &world_size_));
  try {
    watchdog_ = std::make_shared<Watchdog>();
  } catch (...) {
    MPI_Finalize();
    throw;
  }
}

MpiRuntime::~MpiRuntime() {
  watchdog_->stop();
  MPI_Finalize();
}

void MpiRuntime::abort(int code, const std::string& message) const { watchdog_->abort(code, message); }

}  // namespace moeforge
