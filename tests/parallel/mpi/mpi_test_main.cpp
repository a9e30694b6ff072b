#include <cstdio>

#include "tests/parallel/mpi/mpi_testing.h"

namespace moeforge::testing {
namespace {

const MpiRuntime* g_mpi = nullptr;

// On ranks other than 0: each failed assertion, prefixed with the rank (rank 0 prints the full
// report, and the ranks usually fail alike).
class FailurePrinter : public ::testing::EmptyTestEventListener {
 public:
  explicit FailurePrinter(int rank) : rank_(rank) {}
  void OnTestPartResult(const ::testing::TestPartResult& r) override {
    if (!r.failed()) return;
    std::fprintf(stderr, "[rank %d] %s:%d: failure\n%s\n", rank_, r.file_name() ? r.file_name() : "?", r.line_number(),
                 r.summary());
  }

 private:
  int rank_;
};

}  // namespace

const MpiRuntime& mpi() { return *g_mpi; }

}  // namespace moeforge::testing

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  moeforge::MpiRuntime mpi;
  moeforge::testing::g_mpi = &mpi;
  if (mpi.world_rank() != 0) {
    ::testing::TestEventListeners& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new moeforge::testing::FailurePrinter(mpi.world_rank()));
  }
  int failed = RUN_ALL_TESTS() != 0;
  MOE_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, &failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD));
  return failed;
}
