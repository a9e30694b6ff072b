// A job for the watchdog test (tests/parallel/mpi/test_watchdog.cpp), run under mpirun -np 3:
// every rank makes three all_reduces on the dp group (world ranks 0,1,2), then the scenario
// breaks the fourth call:
//   stall    rank 2 sleeps instead of calling all_reduce #4
//   diverge  rank 1 calls all_gather as #4 where ranks 0 and 2 call all_reduce
//   p2p      rank 0 waits in recv from rank 1, which never sends
// The job is expected to end in the watchdog's abort; reaching the end is a failure (exit 0 would
// hide it, so the end prints a line the test looks for and exits 0 only then).
//
//   watchdog_victim <stall|diverge|p2p> <timeout_s>
#include <chrono>
#include <cstdio>
#include <string>
#include <thread>

#include "parallel/mpi_runtime.h"
#include "parallel/process_grid.h"

using namespace moeforge;

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: watchdog_victim <stall|diverge|p2p> <timeout_s>\n");
    return 2;
  }
  const std::string scenario = argv[1];
  const double timeout_s = std::stod(argv[2]);
  MpiRuntime mpi;
  try {
    const ProcessGrid grid = ProcessGrid::create(mpi, {.dp = mpi.world_size()}, timeout_s);
    Comm& dp = grid.dp();
    const int rank = dp.rank();
    Tensor t = Tensor::zeros({4}, DType::kF32);
    for (int i = 0; i < 3; ++i) dp.all_reduce(t);
    const auto stop = [] { std::this_thread::sleep_for(std::chrono::seconds(120)); };
    if (scenario == "stall") {
      rank == 2 ? stop() : dp.all_reduce(t);
    } else if (scenario == "diverge") {
      rank == 1 ? dp.all_gather(t, Tensor::zeros({4 * dp.size()}, DType::kF32)) : dp.all_reduce(t);
    } else if (scenario == "p2p") {
      rank == 0 ? dp.recv(t, 1) : stop();
    } else {
      mpi.abort(2, "watchdog_victim: unknown scenario " + scenario);
    }
    std::printf("watchdog_victim: rank %d was not stopped\n", mpi.world_rank());
  } catch (const Error& e) {
    mpi.abort(1, e.what());
  }
  return 0;
}
