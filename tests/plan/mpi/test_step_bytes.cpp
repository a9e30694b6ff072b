// The planner (launch/plan.h) against moeforge's own measurements on CPU ranks. Run under mpirun
// with a layout, e.g.
//   mpirun -np 4 test_plan_step_bytes --tp 2 --dp 2 --ep 4 --zero 1 --route pair
// Every rank trains `tiny` (shortened) for one step and checks, for itself:
//  - the bytes each of its groups' Comms counted over the step (world, tp, dp, pp, stage, ep,
//    expert_dp, embed) equal the planner's prediction for its coordinates, exactly;
//  - its parameter, gradient and AdamW-state elements equal the planner's (ZeRO-1 owned ranges);
//  - the step's peak activation bytes (the maximum over ranks) equal the planner's maximum over
//    ranks to float rounding (the issue asks for 15%).
// Expert traffic depends on routing: with ep > 1 the layout must use --route pair, a selection
// bias that sends every token to experts 0 and 1, both on EP member 0, so the rows each rank
// sends and receives are known exactly (member 0 receives every copy of its EP group).
// --capacity N runs capacity mode (its TP exchange of per-slot counts) with a factor large enough
// that the forced route drops nothing.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <string>

#include <fmt/format.h>

#include "launch/config.h"
#include "launch/plan.h"
#include "launch/trainer.h"
#include "parallel/mpi_runtime.h"
#include "tests/shared_corpus.h"
#include "tests/testing.h"

namespace moeforge {
namespace {

namespace fs = std::filesystem;

struct Args {
  int tp = 1, dp = 1, pp = 1, ep = 1, zero = 0, vstages = 1, dense = 0;
  int capacity = 0;  // model.capacity_factor when > 0 (large enough that nothing is dropped)
  std::string schedule = "1f1b", route;
  bool tie = false, recompute = false;
};
Args g_args;
MpiRuntime* g_mpi = nullptr;

constexpr int64_t kSeq = 64, kBatch = 8, kMicro = 2;

TEST(PlanStepBytes, EqualMeasured) {
  const Args& a = g_args;
  ASSERT_TRUE(a.ep == 1 || a.route == "pair") << "EP traffic is predicted exactly only under --route pair";
  const ProcessGrid grid =
      ProcessGrid::create(*g_mpi, ParallelSizes{.tp = a.tp, .pp = a.pp, .dp = a.dp, .ep = a.ep}, 60.0);
  const fs::path dir = fs::temp_directory_path() /
                       fmt::format("moeforge_plan_{}_{}_{}_{}_{}_{}_{}_{}_{}_{}", a.tp, a.dp, a.pp, a.ep, a.zero,
                                   a.schedule, a.vstages, a.tie, a.recompute, a.capacity);
  if (!testing::prepare_shared_corpus(grid, dir)) GTEST_SKIP() << "no corpus at ../shared/data/tinyshakespeare.txt";

  std::vector<std::string> overrides = {
      "data.train=" + (dir / "train").string(), "data.val=" + (dir / "val").string(),
      "logging.dir=" + (dir / "run").string(), "logging.tensorboard=false", "logging.jsonl=false",
      "train.steps=1", fmt::format("train.seq_len={}", kSeq), fmt::format("train.global_batch={}", kBatch),
      fmt::format("train.micro_batch={}", kMicro), "train.eval_every=0", "train.sample_tokens=0",
      "optim.warmup_steps=0", "model.n_kv_heads=4", fmt::format("parallel.tp={}", a.tp),
      fmt::format("parallel.dp={}", a.dp), fmt::format("parallel.pp={}", a.pp), fmt::format("parallel.ep={}", a.ep),
      fmt::format("parallel.zero_stage={}", a.zero), fmt::format("parallel.virtual_stages={}", a.vstages),
      fmt::format("model.n_dense_layers={}", a.dense), std::string("model.recompute=") + (a.recompute ? "true" : "false"),
      std::string("model.tie_embeddings=") + (a.tie ? "true" : "false"),
      std::string("parallel.pp_schedule=") + (a.schedule == "gpipe"         ? "GPIPE"
                                              : a.schedule == "interleaved" ? "INTERLEAVED_1F1B"
                                                                            : "ONE_F_ONE_B")};
  if (a.route == "pair") overrides.push_back("model.expert_bias_update_rate=1e-3");
  if (a.capacity > 0) overrides.push_back(fmt::format("model.capacity_factor={}", a.capacity));
  const config::RunConfig run = load_run_config(testing::source_path("configs/tiny.pbtxt"), overrides, grid.world_size());
  Trainer trainer(run, grid);
  const ModelConfig cfg = model_config_from(run);
  if (a.route == "pair") {
    for (int i = a.dense; i < cfg.n_layers; ++i) {
      const std::string name = fmt::format("layers.{}.moe.expert_bias", i);
      if (!trainer.model().registry().contains(name)) continue;  // another stage's layer
      float* b = trainer.model().registry().get(name).value.data<float>();
      b[0] = b[1] = 1e4f;
    }
  }

  const PlanLayout layout{.tp = a.tp, .pp = a.pp, .vstages = a.vstages, .ep = a.ep, .dp = a.dp,
                          .micro_batch = kMicro, .recompute = a.recompute, .zero_stage = a.zero,
                          .schedule = pipeline_schedule_from(run)};
  const StepShape shape{kBatch, kSeq};
  const Precision cpu = Precision::cpu();
  // Rows of one MoE layer's forward of one micro-batch: M = Nl * K copies per rank.
  const double M = static_cast<double>(kMicro * kSeq / a.tp * cfg.top_k);
  const auto rows_of = [&](const RankCoord& r) {
    if (a.ep == 1) return ExpertRows{0, 0, M};
    const bool owner = (r.dp_rank * a.tp + r.tp_rank) % a.ep == 0;  // EP member 0 holds experts 0, 1
    return owner ? ExpertRows{0, (a.ep - 1) * M, a.ep * M} : ExpertRows{M, 0, 0};
  };
  const RankCoord me{grid.tp_rank(), grid.dp_rank(), grid.pp_rank()};

  // Parameters, gradients and optimizer state as allocated.
  const RankParams p = rank_params(cfg, layout, me);
  int64_t values = 0, grads = 0, state = 0;
  for (const Param& q : trainer.model().registry().params()) {
    values += q.value.numel();
    grads += q.grad.numel();
    if (q.spec.trainable) {
      state += trainer.optimizer().adamw().exp_avg(q.spec.name).numel() +
               trainer.optimizer().adamw().exp_avg_sq(q.spec.name).numel();
    }
  }
  EXPECT_EQ(values, p.total()) << "parameter elements";
  EXPECT_EQ(grads, p.total()) << "gradient elements";
  EXPECT_EQ(state, 2 * optimizer_elements(cfg, layout, me)) << "AdamW m and v elements";

  // Bytes per group over one step.
  struct Group {
    const char* name;
    Comm* comm;
    int64_t before;
  };
  std::vector<Group> groups = {{"world", &grid.world(), 0}, {"tp", &grid.tp(), 0},   {"dp", &grid.dp(), 0},
                               {"pp", &grid.pp(), 0},       {"stage", &grid.stage(), 0}, {"ep", &grid.ep(), 0},
                               {"expert_dp", &grid.expert_dp(), 0}, {"embed", &grid.embed(), 0}};
  for (Group& g : groups) g.before = g.comm->bytes_sent();
  const StepMetrics m = trainer.step();
  const StepTraffic t = step_traffic(cfg, layout, shape, me, cpu, rows_of(me));
  const std::map<std::string, double> predicted = {
      {"world", t.world.bytes}, {"tp", t.tp_total()},   {"dp", t.dp.bytes},
      {"pp", t.pp_total()},     {"stage", t.stage.bytes}, {"ep", t.ep.bytes},
      {"expert_dp", t.expert_dp.bytes}, {"embed", t.embed.bytes}};
  int64_t moved = 0;
  for (const Group& g : groups) {
    const int64_t measured = g.comm->bytes_sent() - g.before;
    moved += measured;
    EXPECT_EQ(measured, static_cast<int64_t>(predicted.at(g.name)))
        << "group " << g.name << " on world rank " << grid.world_rank();
  }
  if (grid.world_size() > 1) {
    EXPECT_GT(moved, 0);
  }

  // Peak activations: the step reports the maximum over ranks.
  double peak = 0;
  for (int s = 0; s < a.pp; ++s)
    for (int d = 0; d < a.dp; ++d)
      for (int r = 0; r < a.tp; ++r) {
        const RankCoord c{r, d, s};
        peak = std::max(peak, peak_activation_bytes(cfg, layout, shape, c, cpu, rows_of(c)));
      }
  const double measured = static_cast<double>(m.peak_activation_bytes);
  EXPECT_LE(std::abs(peak - measured), 1e-6 * measured + 1) << "predicted " << peak << " measured " << measured;
  EXPECT_LE(std::abs(peak - measured), 0.15 * measured);

  grid.world().barrier();
  if (grid.world_rank() == 0) fs::remove_all(dir);
}

}  // namespace
}  // namespace moeforge

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  moeforge::Args& a = moeforge::g_args;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--tie" || flag == "--recompute") {  // the flags without a value
      (flag == "--tie" ? a.tie : a.recompute) = true;
      continue;
    }
    if (i + 1 == argc) break;
    const std::string text = argv[++i];
    const int value = std::atoi(text.c_str());
    if (flag == "--tp") a.tp = value;
    if (flag == "--dp") a.dp = value;
    if (flag == "--pp") a.pp = value;
    if (flag == "--ep") a.ep = value;
    if (flag == "--zero") a.zero = value;
    if (flag == "--vstages") a.vstages = value;
    if (flag == "--dense") a.dense = value;
    if (flag == "--capacity") a.capacity = value;
    if (flag == "--schedule") a.schedule = text;
    if (flag == "--route") a.route = text;
  }
  moeforge::MpiRuntime mpi;
  moeforge::g_mpi = &mpi;
  if (mpi.world_rank() != 0 && !std::getenv("MOEFORGE_TEST_ALL_RANKS")) {
    delete ::testing::UnitTest::GetInstance()->listeners().Release(
        ::testing::UnitTest::GetInstance()->listeners().default_result_printer());
  }
  return RUN_ALL_TESTS();
}
