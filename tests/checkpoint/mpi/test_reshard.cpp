// Multi-rank checkpoint tests (mpirun -np 4): a run saved under tp=2 x dp=2 with ZeRO-1 (and
// with ep=2) resumes bitwise on the same layout, and resumes on other layouts — one rank alone,
// dp=4 with ZeRO-1 (ep=4), tp=4, tp=2 x dp=2 without ZeRO (ep=1) — with losses and grad norms
// within 1e-5 of the uninterrupted run; and a checkpoint written by one rank loads into tp=2 x
// dp=2 with ZeRO-1.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>

#include "checkpoint/files.h"
#include "checkpoint/load.h"
#include "checkpoint/save.h"
#include "launch/trainer.h"
#include "tests/checkpoint/checkpoint_testing.h"
#include "tests/parallel/mpi/mpi_testing.h"

namespace moeforge::checkpoint {
namespace {

namespace fs = std::filesystem;

struct Layout {
  int tp = 1, dp = 1, zero = 0, ep = 1;
  bool single = false;  // every rank alone (ProcessGrid::single())
  std::string str() const { return single ? "1 rank" : fmt::format("tp {} x dp {} ep {} zero {}", tp, dp, ep, zero); }
};

const char* kind_name(TensorKind k) { return k == PARAM ? "param" : k == EXP_AVG ? "exp_avg" : "exp_avg_sq"; }

double rel(double a, double b) { return std::abs(a - b) / std::max(std::abs(b), 1e-12); }

class Reshard : public ::testing::Test {
 protected:
  void SetUp() override {
    if (world().world_rank() == 0) {
      fs::remove_all(dir_);
      testing::prepare_corpus(dir_);
    }
    world().world().barrier();
  }
  void TearDown() override {
    world().world().barrier();
    if (world().world_rank() == 0) fs::remove_all(dir_);
  }
  const ProcessGrid& world() const { return world_; }
  ProcessGrid grid(const Layout& l) const {
    if (l.single) return ProcessGrid::single();
    return ProcessGrid::create(testing::mpi(), ParallelSizes{.tp = l.tp, .dp = l.dp, .ep = l.ep}, testing::kTestTimeoutS);
  }
  config::RunConfig run(const Layout& l) const {
    return testing::tiny_run(dir_,
                             {"parallel.tp=" + std::to_string(l.tp), "parallel.dp=" + std::to_string(l.dp),
                              "parallel.zero_stage=" + std::to_string(l.zero), "parallel.ep=" + std::to_string(l.ep)},
                             l.single ? 1 : 4);
  }
  // Trains 5 steps under `from` and saves; returns the uninterrupted run's 10 step metrics.
  std::vector<StepMetrics> save_after_5(const Layout& from) {
    const ProcessGrid g = grid(from);
    const config::RunConfig cfg = run(from);
    Trainer straight(cfg, g);
    std::vector<StepMetrics> want;
    for (int s = 0; s < 10; ++s) want.push_back(straight.step());
    Trainer first(cfg, g);
    for (int s = 0; s < 5; ++s) first.step();
    Saver saver(ckpt(), 3, false, g);
    const std::optional<SaveOutcome> out =
        saver.save({.step = 5, .data_position = first.data_position(), .config = cfg}, first.model().registry(),
                   first.optimizer());
    EXPECT_TRUE(out && out->ok) << (out ? out->error : "no outcome");
    return want;
  }
  // Loads the checkpoint under `to` and trains steps 6-10 against `want`.
  void resume(const Layout& to, const std::vector<StepMetrics>& want, bool bitwise) {
    const ProcessGrid g = grid(to);
    Trainer t(run(to), g);
    const LoadedState s = load(resolve_checkpoint(ckpt()), t.model().registry(), &t.optimizer());
    t.restore_position(s.manifest.step());
    for (int i = 5; i < 10; ++i) {
      const StepMetrics m = t.step();
      if (bitwise) {
        EXPECT_EQ(m.loss.loss, want[i].loss.loss) << to.str() << " step " << i + 1;
        EXPECT_EQ(m.grad_norm, want[i].grad_norm) << to.str() << " step " << i + 1;
      } else {
        EXPECT_LE(rel(m.loss.loss, want[i].loss.loss), 1e-5)
            << to.str() << " step " << i + 1 << ": " << m.loss.loss << " vs " << want[i].loss.loss;
        EXPECT_LE(rel(m.grad_norm, want[i].grad_norm), 1e-5) << to.str() << " step " << i + 1;
      }
    }
  }
  std::string ckpt() const { return dir_ + "/ckpt"; }

  ProcessGrid world_ = ProcessGrid::create(testing::mpi(), ParallelSizes{.tp = 1, .dp = 4}, testing::kTestTimeoutS);
  std::string dir_ = (fs::temp_directory_path() / "moeforge_checkpoint_reshard").string();
};

TEST_F(Reshard, Tp2Dp2Zero1ResumesOnAnyLayout) {
  const std::vector<StepMetrics> want = save_after_5({.tp = 2, .dp = 2, .zero = 1});
  if (world().world_rank() == 0) {
    // One file per writing rank: dp rank 0's two TP ranks.
    const Manifest m = read_manifest(ckpt() + "/step_00000005");
    EXPECT_EQ(m.files_size(), 2);
    EXPECT_EQ(m.layout().tp(), 2);
    EXPECT_EQ(m.layout().zero_stage(), 1);
    EXPECT_TRUE(verify(ckpt() + "/step_00000005").empty());
  }
  resume({.tp = 2, .dp = 2, .zero = 1}, want, /*bitwise=*/true);
  resume({.single = true}, want, false);
  resume({.tp = 1, .dp = 4, .zero = 1}, want, false);
  resume({.tp = 4, .dp = 1, .zero = 0}, want, false);
  resume({.tp = 2, .dp = 2, .zero = 0}, want, false);
}

// Experts split over ep = 2 (two experts per rank), their ZeRO-1 state over expert-DP.
TEST_F(Reshard, Tp2Dp2Ep2Zero1ResumesUnderOtherEp) {
  const std::vector<StepMetrics> want = save_after_5({.tp = 2, .dp = 2, .zero = 1, .ep = 2});
  if (world().world_rank() == 0) {
    // Each expert tensor in two pieces of two experts, one per EP rank.
    const Manifest m = read_manifest(ckpt() + "/step_00000005");
    for (const TensorEntry& t : m.tensors()) {
      if (t.name() != "layers.0.moe.experts.w1") continue;
      ASSERT_EQ(t.pieces_size(), 2) << kind_name(t.kind());
      EXPECT_EQ(t.pieces(1).offset(0), 2);
      EXPECT_EQ(t.pieces(1).shape(0), 2);
    }
  }
  resume({.tp = 2, .dp = 2, .zero = 1, .ep = 2}, want, /*bitwise=*/true);
  resume({.single = true}, want, false);
  resume({.tp = 1, .dp = 4, .zero = 1, .ep = 4}, want, false);
  resume({.tp = 2, .dp = 2, .zero = 0, .ep = 1}, want, false);
}

TEST_F(Reshard, SingleRankCheckpointLoadsIntoTp2Dp2Zero1) {
  // Every rank computes the one-rank run; rank 0 alone writes it (the others save elsewhere).
  const Layout one{.single = true};
  const ProcessGrid g = grid(one);
  const config::RunConfig cfg = run(one);
  Trainer straight(cfg, g);
  std::vector<StepMetrics> want;
  for (int s = 0; s < 10; ++s) want.push_back(straight.step());
  if (world().world_rank() == 0) {
    Trainer first(cfg, g);
    for (int s = 0; s < 5; ++s) first.step();
    Saver saver(ckpt(), 3, false, g);
    const auto out = saver.save({.step = 5, .data_position = first.data_position(), .config = cfg},
                                first.model().registry(), first.optimizer());
    EXPECT_TRUE(out && out->ok);
  }
  world().world().barrier();
  resume({.tp = 2, .dp = 2, .zero = 1}, want, false);
}

}  // namespace
}  // namespace moeforge::checkpoint
