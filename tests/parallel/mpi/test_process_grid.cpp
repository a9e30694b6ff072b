// ProcessGrid on 4 and 8 ranks: for every layout that fits the world, each group's members
// (world ranks, in order), this rank's coordinates, and a sum over each group, against membership
// rules written out independently of parallel/process_grid.cpp; bad layouts fail with the same
// message on every rank.
#include <functional>
#include <numeric>

#include "parallel/process_grid.h"
#include "tests/parallel/mpi/mpi_testing.h"

namespace moeforge {
namespace {

using testing::kTestTimeoutS;
using testing::mpi;

// Coordinates of world rank w, from the layout's definition: TP fastest, then DP, then PP; within
// a stage, ranks in order dp * tp + tp are cut into EP groups of ep consecutive ranks.
struct Coords {
  int tp, dp, pp, ep, edp;
};

Coords coords(const ParallelSizes& s, int w) {
  Coords c{};
  c.tp = w % s.tp;
  c.dp = (w / s.tp) % s.dp;
  c.pp = w / (s.tp * s.dp);
  const int in_stage = c.dp * s.tp + c.tp;
  c.ep = in_stage % s.ep;
  c.edp = in_stage / s.ep;
  return c;
}

// World ranks sharing this rank's group, ordered by their rank in it.
std::vector<int> members(const ParallelSizes& s, int me, const std::function<bool(const Coords&, const Coords&)>& same,
                         const std::function<int(const Coords&)>& order) {
  const int world = s.tp * s.pp * s.dp;
  std::vector<int> out;
  for (int w = 0; w < world; ++w) {
    if (same(coords(s, me), coords(s, w))) out.push_back(w);
  }
  std::sort(out.begin(), out.end(), [&](int a, int b) { return order(coords(s, a)) < order(coords(s, b)); });
  return out;
}

void expect_group(Comm& comm, const std::vector<int>& want, int world_rank, const char* name) {
  SCOPED_TRACE(name);
  EXPECT_EQ(comm.name(), name);
  EXPECT_EQ(comm.world_ranks(), want);
  ASSERT_EQ(comm.size(), static_cast<int>(want.size()));
  EXPECT_EQ(want.at(comm.rank()), world_rank);
  // The group communicates among exactly those members.
  Tensor t = Tensor::from_ints({1}, std::vector<int32_t>{world_rank});
  comm.all_reduce(t);
  EXPECT_EQ(t.data<int32_t>()[0], std::accumulate(want.begin(), want.end(), 0));
}

std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(ProcessGrid, GroupsMatchTheLayoutDefinition) {
  const std::vector<ParallelSizes> layouts{{.tp = 2, .pp = 1, .dp = 2, .ep = 1}, {.tp = 2, .pp = 2, .dp = 1, .ep = 1},
                                           {.tp = 1, .pp = 1, .dp = 4, .ep = 2}, {.tp = 2, .pp = 1, .dp = 2, .ep = 4},
                                           {.tp = 2, .pp = 2, .dp = 2, .ep = 2}, {.tp = 2, .pp = 1, .dp = 4, .ep = 8},
                                           {.tp = 1, .pp = 2, .dp = 4, .ep = 2}, {.tp = 4, .pp = 1, .dp = 2, .ep = 4}};
  const int me = mpi().world_rank();
  int tested = 0;
  for (const ParallelSizes& s : layouts) {
    if (s.tp * s.pp * s.dp != mpi().world_size()) continue;
    ++tested;
    SCOPED_TRACE(fmt::format("tp {} pp {} dp {} ep {}", s.tp, s.pp, s.dp, s.ep));
    const ProcessGrid grid = ProcessGrid::create(mpi(), s, kTestTimeoutS);
    const Coords c = coords(s, me);
    EXPECT_EQ(grid.world_rank(), me);
    EXPECT_EQ(grid.world_size(), mpi().world_size());
    EXPECT_EQ(grid.tp_rank(), c.tp);
    EXPECT_EQ(grid.dp_rank(), c.dp);
    EXPECT_EQ(grid.pp_rank(), c.pp);
    EXPECT_EQ(grid.ep_rank(), c.ep);
    EXPECT_EQ(grid.expert_dp_rank(), c.edp);

    std::vector<int> all(mpi().world_size());
    std::iota(all.begin(), all.end(), 0);
    expect_group(grid.world(), all, me, "world");
    expect_group(
        grid.tp(),
        members(
            s, me, [](auto& a, auto& b) { return a.pp == b.pp && a.dp == b.dp; }, [](auto& x) { return x.tp; }),
        me, "tp");
    expect_group(
        grid.dp(),
        members(
            s, me, [](auto& a, auto& b) { return a.pp == b.pp && a.tp == b.tp; }, [](auto& x) { return x.dp; }),
        me, "dp");
    expect_group(
        grid.pp(),
        members(
            s, me, [](auto& a, auto& b) { return a.dp == b.dp && a.tp == b.tp; }, [](auto& x) { return x.pp; }),
        me, "pp");
    auto in_stage = [&](const Coords& x) { return x.dp * s.tp + x.tp; };
    expect_group(grid.stage(),
                 members(
                     s, me, [](auto& a, auto& b) { return a.pp == b.pp; }, in_stage),
                 me, "stage");
    expect_group(grid.ep(),
                 members(
                     s, me, [](auto& a, auto& b) { return a.pp == b.pp && a.edp == b.edp; }, in_stage),
                 me, "ep");
    expect_group(grid.expert_dp(),
                 members(
                     s, me, [](auto& a, auto& b) { return a.pp == b.pp && a.ep == b.ep; }, in_stage),
                 me, "expert_dp");
    // A copy shares the groups.
    const ProcessGrid copy = grid;
    EXPECT_EQ(&copy.tp(), &grid.tp());
  }
  EXPECT_GE(tested, 1) << "no layout for world size " << mpi().world_size();
}

TEST(ProcessGrid, BadLayoutsFailWithTheSameMessageOnEveryRank) {
  const int world = mpi().world_size();
  const std::vector<std::pair<ParallelSizes, std::string>> cases{
      {{.tp = 3},
       fmt::format("parallel layout tp 3 x pp 1 x dp 1 = 3 ranks does not match the world size {} (the number of "
                   "processes started by mpirun/srun)",
                   world)},
      {{.tp = 2, .dp = world / 2, .ep = 3},
       fmt::format("parallel.ep (3) must divide tp x dp = {}: expert parallelism regroups the tp x dp ranks of a "
                   "pipeline stage",
                   world)},
      {{.tp = 0, .dp = world}, "parallel.tp must be >= 1, got 0"},
  };
  int failures = 0;
  for (const auto& [sizes, message] : cases) {
    const std::string got = error_of([&] { ProcessGrid::create(mpi(), sizes, kTestTimeoutS); });
    EXPECT_EQ(got, message);
    failures += got == message;
  }
  EXPECT_EQ(error_of([&] { ProcessGrid::create(mpi(), {.dp = world}, 0.0); }),
            "parallel.collective_timeout_s must be > 0 seconds, got 0");
  // Every rank failed every case, and none is left inside a collective: the world still works.
  Tensor t = Tensor::from_ints({1}, std::vector<int32_t>{failures});
  ProcessGrid::create(mpi(), {.dp = world}, kTestTimeoutS).world().all_reduce(t);
  EXPECT_EQ(t.data<int32_t>()[0], 3 * world);
}

}  // namespace
}  // namespace moeforge
