// ProcessGrid without MPI: the single-process grid, and the layout checks with their messages
// (the multi-rank group tests are in tests/parallel/mpi/test_process_grid.cpp).
#include <gtest/gtest.h>

#include "parallel/process_grid.h"
#include "runtime/error.h"

namespace moeforge {
namespace {

std::string error_of(const ParallelSizes& sizes, int world_size) {
  try {
    check_parallel_sizes(sizes, world_size);
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(ProcessGrid, SingleHasEveryGroupOfOne) {
  const ProcessGrid g = ProcessGrid::single();
  for (Comm* c : {&g.world(), &g.tp(), &g.dp(), &g.pp(), &g.stage(), &g.ep(), &g.expert_dp()}) {
    EXPECT_EQ(c->size(), 1) << c->name();
    EXPECT_EQ(c->world_ranks(), std::vector<int>{0}) << c->name();
  }
  EXPECT_EQ(g.dp().name(), "dp");
  EXPECT_EQ(g.expert_dp().name(), "expert_dp");
  EXPECT_EQ(g.world_size(), 1);
  EXPECT_EQ(g.tp_rank() + g.dp_rank() + g.pp_rank() + g.ep_rank() + g.expert_dp_rank(), 0);
  EXPECT_EQ(g.sizes().tp * g.sizes().pp * g.sizes().dp * g.sizes().ep, 1);
}

TEST(ProcessGrid, LayoutChecks) {
  EXPECT_EQ(error_of({.tp = 2, .pp = 2, .dp = 2, .ep = 4}, 8), "(no error)");
  EXPECT_EQ(error_of({.tp = 2, .pp = 1, .dp = 3}, 4),
            "parallel layout tp 2 x pp 1 x dp 3 = 6 ranks does not match the world size 4 (the number of processes "
            "started by mpirun/srun)");
  EXPECT_EQ(error_of({.tp = 2, .pp = 2, .dp = 2, .ep = 3}, 8),
            "parallel.ep (3) must divide tp x dp = 4: expert parallelism regroups the tp x dp ranks of a pipeline "
            "stage");
  EXPECT_EQ(error_of({.tp = 1, .pp = -1}, 1), "parallel.pp must be >= 1, got -1");
  EXPECT_EQ(error_of({.ep = 0}, 1), "parallel.ep must be >= 1, got 0");
}

}  // namespace
}  // namespace moeforge
