// The central test of moeforge (DESIGN.md principle 1): any parallel layout reproduces the
// single-rank run. Run under mpirun with the layout on the command line, e.g.
//   mpirun -np 4 test_parallel_layout_invariance --tp 2 --dp 2 --ep 4 --zero 1
// Every rank trains `tiny` for 5 optimizer steps in the layout, and also trains the same model
// alone (ProcessGrid::single()) as the reference. Per step, loss, aux loss and grad norm must
// match to 1e-5 relative and the per-layer expert loads (tokens per expert, dropped fraction)
// exactly; after step 5 every rank's parameter shards must equal the corresponding slices of the
// reference parameters to 1e-5 (normwise per parameter, padding rows skipped).
//
// Options beyond the layout:
//   --capacity 1   capacity mode with that factor (the same token groups: micro-batches)
//   --route one    top-1 and a selection bias that sends every token to expert 0, so every other
//                  EP rank receives zero tokens in every layer
//   --route starve sigmoid gating, a shared expert, aux-loss-free bias updates, and a selection
//                  bias that keeps every token away from experts 2 and 3 (EP rank 1 of 4 starves)
//   --pp N --schedule gpipe|1f1b|interleaved --vstages V --split "3,1"   pipeline parallelism; the
//                  most micro-batches in flight on a rank must be the schedule's bound
//   --dense N      the first N layers dense (with --split 1,3 a stage holds no MoE layer)
//   --tie          tied embeddings (a replica on the last stage)
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>

#include <fmt/format.h>

#include "launch/config.h"
#include "launch/trainer.h"
#include "parallel/mpi_runtime.h"
#include "tests/shared_corpus.h"
#include "tests/testing.h"

namespace moeforge {
namespace {

namespace fs = std::filesystem;

struct Layout {
  int tp = 1, dp = 1, ep = 1, zero = 0;
  int capacity = 0;   // model.capacity_factor when > 0
  std::string route;  // "", "one" or "starve"
  int pp = 1, vstages = 1, dense = 0;
  std::string schedule = "1f1b", split;
  bool tie = false;
  // --bf16: both runs in bf16 mixed precision. A layout changes where bf16 roundings happen (a
  // TP row-parallel output is rounded per partial sum before the f32 reduction, a pipeline sends
  // bf16 rows), so the runs agree to bf16's resolution rather than f32's, and a token whose two
  // best router scores are within that resolution may pick another expert: loads are compared
  // in total only.
  bool bf16 = false;
  // --mask: attention with a sliding window of 24 tokens and documents started by every newline
  // (token 10: several per 64-token row), so windows and document bounds fall inside rows, at
  // row starts and across the TP row split; with activation recomputation, so the backward's
  // re-run forward takes the same mask.
  bool mask = false;
};
Layout g_layout;
MpiRuntime* g_mpi = nullptr;

// Flat index in the global tensor of element `local` of shard p.
int64_t global_index(const Param& p, const Shape& global, int64_t local) {
  const Shape& ls = p.value.shape();
  std::array<int64_t, Shape::kMaxDims> idx{};
  int64_t rem = local;
  for (int d = ls.ndim() - 1; d >= 0; --d) {
    idx[d] = rem % ls[d];
    rem /= ls[d];
  }
  int64_t g = 0;
  for (int d = 0; d < ls.ndim(); ++d) g = g * global[d] + idx[d] + p.slice.offset[d];
  return g;
}

double rel(double a, double b) { return std::abs(a - b) / std::max(std::abs(b), 1e-12); }

TEST(LayoutInvariance, MatchesSingleRankRun) {
  const ProcessGrid grid = ProcessGrid::create(
      *g_mpi, ParallelSizes{.tp = g_layout.tp, .pp = g_layout.pp, .dp = g_layout.dp, .ep = g_layout.ep},
      /*collective_timeout_s=*/120.0);
  // Data: a small corpus prepared by rank 0 into a directory every rank reads.
  const fs::path dir = fs::temp_directory_path() /
                       fmt::format("moeforge_layout_{}_{}_{}_{}_{}_{}_{}_{}_{}_{}_{}_{}_{}_{}", g_layout.tp,
                                   g_layout.dp, g_layout.ep, g_layout.zero, g_layout.capacity, g_layout.route,
                                   g_layout.pp, g_layout.schedule, g_layout.vstages, g_layout.split, g_layout.dense,
                                   g_layout.tie, g_layout.bf16, g_layout.mask);
  if (!testing::prepare_shared_corpus(grid, dir)) GTEST_SKIP() << "no corpus at ../shared/data/tinyshakespeare.txt";

  // tiny, shortened: 8 sequences of 64 tokens per step in micro-batches of 2, so every layout
  // also accumulates gradients. n_kv_heads 4 lets tp = 4 split the kv heads.
  std::vector<std::string> overrides = {
      "data.train=" + (dir / "train").string(), "data.val=" + (dir / "val").string(),
      "logging.dir=" + (dir / "run").string(), "train.steps=5", "train.seq_len=64", "train.global_batch=8",
      "train.micro_batch=2", "train.eval_every=0", "train.sample_tokens=0", "optim.warmup_steps=2",
      "model.n_kv_heads=4", "parallel.tp=" + std::to_string(g_layout.tp), "parallel.dp=" + std::to_string(g_layout.dp),
      "parallel.zero_stage=" + std::to_string(g_layout.zero), "parallel.ep=" + std::to_string(g_layout.ep),
      "logging.tensorboard=false"};
  if (g_layout.capacity > 0) overrides.push_back("model.capacity_factor=" + std::to_string(g_layout.capacity));
  if (g_layout.dense > 0) overrides.push_back("model.n_dense_layers=" + std::to_string(g_layout.dense));
  if (g_layout.tie) overrides.push_back("model.tie_embeddings=true");
  if (g_layout.mask) overrides.insert(overrides.end(), {"model.sliding_window=24", "model.document_start_token=10",
                                                   "model.recompute=true"});
  if (g_layout.bf16) {
    // A tenth of tiny's learning rate: Adam turns a rounding-sized gradient difference into a
    // full-sized update difference for elements whose gradient is near zero, so the parameters'
    // distance grows with lr; the loss trajectory is the same story either way.
    overrides.insert(overrides.end(), {"train.precision=BF16", "optim.lr=3e-4", "optim.min_lr=3e-5"});
  }
  const double tol = g_layout.bf16 ? 2e-2 : 1e-5;
  overrides.push_back("parallel.pp=" + std::to_string(g_layout.pp));
  overrides.push_back("parallel.virtual_stages=" + std::to_string(g_layout.vstages));
  overrides.push_back(std::string("parallel.pp_schedule=") +
                      (g_layout.schedule == "gpipe"         ? "GPIPE"
                       : g_layout.schedule == "interleaved" ? "INTERLEAVED_1F1B"
                                                            : "ONE_F_ONE_B"));
  if (!g_layout.split.empty()) overrides.push_back("parallel.pp_split=" + g_layout.split);
  if (g_layout.route == "one") {
    overrides.insert(overrides.end(), {"model.top_k=1", "model.expert_bias_update_rate=1e-3"});
  } else if (g_layout.route == "starve") {
    overrides.insert(overrides.end(), {"model.gating=SIGMOID_TOPK", "model.n_shared_experts=1",
                                       "model.expert_bias_update_rate=1e-3"});
  }
  const std::string config = testing::source_path("configs/tiny.pbtxt");
  const config::RunConfig run = load_run_config(config, overrides, grid.world_size());
  std::vector<std::string> single_overrides = overrides;
  for (const char* o : {"parallel.pp=1", "parallel.virtual_stages=1", "parallel.pp_schedule=ONE_F_ONE_B", "parallel.pp_split="})
    single_overrides.push_back(o);
  single_overrides.push_back("parallel.tp=1");
  single_overrides.push_back("parallel.dp=1");
  single_overrides.push_back("parallel.zero_stage=0");
  single_overrides.push_back("parallel.ep=1");
  single_overrides.push_back("logging.jsonl=false");
  const config::RunConfig single_run = load_run_config(config, single_overrides, 1);

  Trainer parallel(run, grid);
  Trainer reference(single_run, ProcessGrid::single());
  if (!g_layout.route.empty()) {  // the forced routes: a large selection bias, the same in both runs
    for (Trainer* t : {&parallel, &reference})
      for (int i = 0; i < t->model().config().n_layers; ++i) {
        float* b = t->model().registry().get(fmt::format("layers.{}.moe.expert_bias", i)).value.data<float>();
        if (g_layout.route == "one") b[0] = 1e4f;
        if (g_layout.route == "starve") b[2] = b[3] = -1e4f;
      }
  }
  double dropped = 0.0;
  for (int s = 1; s <= 5; ++s) {
    const StepMetrics a = parallel.step();
    const StepMetrics b = reference.step();
    EXPECT_LE(rel(a.loss.loss, b.loss.loss), tol) << "step " << s << " loss " << a.loss.loss << " vs " << b.loss.loss;
    EXPECT_LE(rel(a.loss.aux, b.loss.aux), tol) << "step " << s << " aux";
    EXPECT_LE(rel(a.grad_norm, b.grad_norm), tol) << "step " << s << " grad norm " << a.grad_norm << " vs "
                                                  << b.grad_norm;
    if (g_layout.bf16 && grid.world_rank() == 0)
      std::printf("bf16 step %d: loss %.6f vs %.6f (rel %.2e), grad norm %.6f vs %.6f\n", s, a.loss.loss, b.loss.loss,
                  rel(a.loss.loss, b.loss.loss), a.grad_norm, b.grad_norm);
    if (g_layout.pp > 1) {  // the schedule's memory bound, measured on the ranks
      const int m = 8 / 2 / g_layout.dp, p = g_layout.pp, v = g_layout.vstages;
      const int64_t bound = g_layout.schedule == "gpipe"         ? m
                            : g_layout.schedule == "interleaved" ? std::min((p - 1) * 2 + (v - 1) * p + 1, m * v)
                                                                 : std::min(p, m);
      EXPECT_EQ(a.max_in_flight, bound) << "step " << s;
      EXPECT_GT(a.peak_activation_bytes, 0);
      EXPECT_GE(a.bubble, 0.0);
      EXPECT_LT(a.bubble, 1.0);
    }
    ASSERT_EQ(a.moe.size(), b.moe.size());
    for (size_t i = 0; i < a.moe.size() && g_layout.bf16; ++i)
      EXPECT_EQ(a.moe[i].dropped_fraction, 0.0) << "dropless, step " << s << " layer " << i;
    for (size_t i = 0; i < a.moe.size() && !g_layout.bf16; ++i) {
      EXPECT_EQ(a.moe[i].min_tokens, b.moe[i].min_tokens) << "step " << s << " layer " << i;
      EXPECT_EQ(a.moe[i].max_tokens, b.moe[i].max_tokens) << "step " << s << " layer " << i;
      EXPECT_DOUBLE_EQ(a.moe[i].cv, b.moe[i].cv) << "step " << s << " layer " << i;
      EXPECT_DOUBLE_EQ(a.moe[i].dropped_fraction, b.moe[i].dropped_fraction) << "step " << s << " layer " << i;
      dropped = std::max(dropped, a.moe[i].dropped_fraction);
      const int64_t copies = int64_t{8} * 64 * parallel.model().config().top_k;  // global batch x top_k
      if (g_layout.route == "one") {
        EXPECT_EQ(a.moe[i].max_tokens, copies) << "every copy goes to expert 0";
        EXPECT_EQ(a.moe[i].min_tokens, 0);
      }
      if (g_layout.route == "starve") {
        EXPECT_EQ(a.moe[i].min_tokens, 0) << "experts 2 and 3 get nothing";
      }
    }
  }
  if (g_layout.capacity > 0) {
    if (grid.world_rank() == 0) std::printf("capacity factor %d: up to %.2f%% of a layer's copies dropped\n", g_layout.capacity, 100.0 * dropped);
    EXPECT_GT(dropped, 0.0) << "capacity mode should have dropped copies of the unbalanced router";
  } else {
    EXPECT_EQ(dropped, 0.0) << "dropless";
  }
  for (const Param& p : parallel.model().registry().params()) {
    const Param& full = reference.model().registry().get(p.spec.name);
    const float* ref = full.value.data<float>();
    const float* got = p.value.data<float>();
    const int64_t valid_rows = full.value.dim(0) - full.spec.padded_rows;
    double num = 0.0, den = 0.0;
    for (int64_t i = 0; i < p.value.numel(); ++i) {
      const int64_t g = global_index(p, full.value.shape(), i);
      if (p.value.ndim() >= 1 && g / (full.value.numel() / full.value.dim(0)) >= valid_rows) continue;  // padding
      num += (got[i] - ref[g]) * (got[i] - ref[g]);
      den += static_cast<double>(ref[g]) * ref[g];
    }
    EXPECT_LE(std::sqrt(num / std::max(den, 1e-30)), tol) << p.spec.name << " after 5 steps";
    if (g_layout.bf16) {  // the masters stay f32; the compute copy is their rounding
      ASSERT_EQ(p.compute.dtype(), p.spec.trainable ? DType::kBF16 : DType::kF32) << p.spec.name;
      if (p.spec.trainable) {
        const Tensor rounded = p.value.to(DType::kBF16);
        EXPECT_EQ(std::memcmp(rounded.raw_data(), p.compute.raw_data(), rounded.nbytes()), 0) << p.spec.name;
      }
    }
  }
  grid.world().barrier();
  if (grid.world_rank() == 0) fs::remove_all(dir);
}

}  // namespace
}  // namespace moeforge

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--tie" || flag == "--bf16" || flag == "--mask") {  // the flags without a value
      (flag == "--tie" ? moeforge::g_layout.tie : flag == "--bf16" ? moeforge::g_layout.bf16 : moeforge::g_layout.mask) =
          true;
      continue;
    }
    if (i + 1 == argc) break;
    const std::string text = argv[++i];
    const int value = std::atoi(text.c_str());
    if (flag == "--tp") moeforge::g_layout.tp = value;
    if (flag == "--dp") moeforge::g_layout.dp = value;
    if (flag == "--zero") moeforge::g_layout.zero = value;
    if (flag == "--ep") moeforge::g_layout.ep = value;
    if (flag == "--capacity") moeforge::g_layout.capacity = value;
    if (flag == "--route") moeforge::g_layout.route = text;
    if (flag == "--pp") moeforge::g_layout.pp = value;
    if (flag == "--vstages") moeforge::g_layout.vstages = value;
    if (flag == "--schedule") moeforge::g_layout.schedule = text;
    if (flag == "--split") moeforge::g_layout.split = text;
    if (flag == "--dense") moeforge::g_layout.dense = value;
  }
  moeforge::MpiRuntime mpi;
  moeforge::g_mpi = &mpi;
  // Only rank 0 prints gtest's report (every rank with MOEFORGE_TEST_ALL_RANKS set); every rank's
  // failures still fail the job's exit code.
  if (mpi.world_rank() != 0 && !std::getenv("MOEFORGE_TEST_ALL_RANKS")) {
    delete ::testing::UnitTest::GetInstance()->listeners().Release(
        ::testing::UnitTest::GetInstance()->listeners().default_result_printer());
  }
  return RUN_ALL_TESTS();
}
