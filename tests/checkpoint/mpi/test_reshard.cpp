// Multi-rank checkpoint tests (mpirun -np 4): a run saved under tp=2 x dp=2 with ZeRO-1 (and
// with ep=2) resumes bitwise on the same layout, and resumes on other layouts — one rank alone,
// dp=4 with ZeRO-1 (ep=4), tp=4, tp=2 x dp=2 without ZeRO (ep=1), pp=2 x dp=2 — with losses and
// grad norms within 1e-5 of the uninterrupted run; a checkpoint written by one rank loads into
// tp=2 x dp=2 with ZeRO-1; a model with tied embeddings saved under pp=2 x dp=2 (each stage
// writes its layers, the last stage's embedding replica is not written) resumes on one rank and
// under pp=2 bitwise; a checkpoint of another model is refused by a pipeline even though no
// single stage holds all of the model.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <map>

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
  int tp = 1, pp = 1, dp = 1, zero = 0, ep = 1;
  bool single = false;  // every rank alone (ProcessGrid::single())
  bool tie = false;     // model.tie_embeddings
  std::string str() const {
    return single ? "1 rank" : fmt::format("tp {} x pp {} x dp {} ep {} zero {}", tp, pp, dp, ep, zero);
  }
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
    return ProcessGrid::create(testing::mpi(), ParallelSizes{.tp = l.tp, .pp = l.pp, .dp = l.dp, .ep = l.ep},
                               testing::kTestTimeoutS);
  }
  config::RunConfig run(const Layout& l) const {
    return testing::tiny_run(dir_,
                             {"parallel.tp=" + std::to_string(l.tp), "parallel.pp=" + std::to_string(l.pp),
                              "parallel.dp=" + std::to_string(l.dp), "parallel.zero_stage=" + std::to_string(l.zero),
                              "parallel.ep=" + std::to_string(l.ep),
                              std::string("model.tie_embeddings=") + (l.tie ? "true" : "false")},
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
    const LoadedState s = load(resolve_checkpoint(ckpt()), t.model().registry(), &t.optimizer(), &g.pp());
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
  resume({.pp = 2, .dp = 2}, want, false);
}

// Tied embeddings under pp = 2: the first stage holds embed.weight, the last stage a replica for
// the LM head. Each stage writes its own layers; the replica is not written, and loading fills it
// from the first stage's copy.
TEST_F(Reshard, TiedPp2Dp2ResumesOnOneRank) {
  const std::vector<StepMetrics> want = save_after_5({.pp = 2, .dp = 2, .tie = true});
  if (world().world_rank() == 0) {
    const Manifest m = read_manifest(ckpt() + "/step_00000005");
    // Writers: dp rank 0 of each stage (world ranks 0 and 2); stage 0 holds layer 0 and the
    // embedding, stage 1 layer 1 and the final norm; no lm_head (tied), one embed.weight piece.
    ASSERT_EQ(m.files_size(), 2);
    EXPECT_EQ(m.files(0).name(), "rank_00000.h5");
    EXPECT_EQ(m.files(1).name(), "rank_00002.h5");
    const std::map<std::string, std::string> file_of = {{"embed.weight", "rank_00000.h5"},
                                                        {"layers.0.attn.wq", "rank_00000.h5"},
                                                        {"layers.1.attn.wq", "rank_00002.h5"},
                                                        {"final_norm.weight", "rank_00002.h5"}};
    int found = 0;
    for (const TensorEntry& t : m.tensors()) {
      EXPECT_NE(t.name(), "lm_head.weight");
      ASSERT_EQ(t.pieces_size(), 1) << t.name() << " " << kind_name(t.kind());
      const auto it = file_of.find(t.name());
      if (it == file_of.end()) continue;
      EXPECT_EQ(t.pieces(0).file(), it->second) << t.name() << " " << kind_name(t.kind());
      ++found;
    }
    EXPECT_EQ(found, 3 * 4) << "each of the four tensors with both moments";
    // The manifest covers the whole model: every tensor of the single-rank model, both moments.
    Trainer whole(run({.single = true, .tie = true}), ProcessGrid::single());
    int want_tensors = 0;
    for (const Param& p : whole.model().registry().params()) want_tensors += p.spec.trainable ? 3 : 1;
    EXPECT_EQ(m.tensors_size(), want_tensors);
    EXPECT_TRUE(verify(ckpt() + "/step_00000005").empty());
  }
  resume({.single = true, .tie = true}, want, false);
  resume({.pp = 2, .dp = 2, .tie = true}, want, /*bitwise=*/true);
}

// A pipeline stage holds only some of the model, but a tensor that no stage holds still means a
// checkpoint of another model: here a 3-layer checkpoint into a 2-layer pipeline.
TEST_F(Reshard, PipelineRefusesAnotherModel) {
  const Layout pp2{.pp = 2, .dp = 2};
  if (world().world_rank() == 0) {
    const config::RunConfig cfg = testing::tiny_run(dir_, {"model.n_layers=3"});
    Trainer three(cfg, ProcessGrid::single());
    Saver saver(ckpt(), 1, false, ProcessGrid::single());
    const auto out = saver.save({.step = 0, .data_position = 0, .config = cfg}, three.model().registry(),
                                three.optimizer());
    EXPECT_TRUE(out && out->ok);
  }
  world().world().barrier();
  const ProcessGrid g = grid(pp2);
  Trainer t(run(pp2), g);
  const std::string step = ckpt() + "/step_00000000";
  EXPECT_EQ(testing::error_of([&] { load(step, t.model().registry(), &t.optimizer(), &g.pp()); }),
            fmt::format("checkpoint {}: tensor layers.2.attn_norm.weight is not a parameter of this model (a checkpoint of "
                        "another model?)",
                        step));
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
