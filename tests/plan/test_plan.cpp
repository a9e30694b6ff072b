// The planner's model (launch/plan.h) against the single-process model it describes, cluster
// files, and the planner's speed at scale (launch/plan_search.h). The multi-rank checks of bytes,
// state and activations are in tests/plan/mpi/test_step_bytes.cpp.
#include <gtest/gtest.h>

#include <chrono>
#include <filesystem>
#include <fstream>

#include "launch/cluster.h"
#include "launch/config.h"
#include "launch/plan.h"
#include "launch/plan_search.h"
#include "models/transformer.h"
#include "tests/testing.h"

namespace moeforge {
namespace {

ModelConfig small_model() {
  ModelConfig cfg;
  cfg.vocab_size = 67;
  cfg.dim = 32;
  cfg.n_layers = 3;
  cfg.n_heads = 4;
  cfg.n_kv_heads = 2;
  cfg.head_dim = 8;
  cfg.n_experts = 4;
  cfg.top_k = 2;
  cfg.expert_hidden = 24;
  cfg.dense_hidden = 40;
  return cfg;
}

// One forward of the whole model keeps exactly the planner's unit of activations, and the
// registry holds exactly the planner's parameters.
void expect_model_matches(const ModelConfig& cfg, int64_t B, int64_t T) {
  MoeTransformer model(cfg);
  model.registry().init(7);
  Tensor tokens = Tensor::empty({B, T}, DType::kI32), targets = Tensor::empty({B, T}, DType::kI32);
  for (int64_t i = 0; i < B * T; ++i) {
    tokens.data<int32_t>()[i] = static_cast<int32_t>((i * 37 + 5) % cfg.vocab_size);
    targets.data<int32_t>()[i] = static_cast<int32_t>((i * 11 + 3) % cfg.vocab_size);
  }
  model.forward(tokens, targets);
  const PlanLayout layout{.micro_batch = B, .recompute = cfg.recompute};
  const ExpertRows rows{0, 0, static_cast<double>(B * T * cfg.top_k)};
  EXPECT_EQ(static_cast<double>(model.activation_bytes()),
            unit_activation_bytes(cfg, layout, StepShape{B, T}, RankCoord{}, 0, Precision::cpu(), rows));
  const RankParams p = rank_params(cfg, layout, RankCoord{});
  EXPECT_EQ(model.registry().local_numel(), p.total());
  int64_t frozen = 0;
  for (const Param& q : model.registry().params()) frozen += q.spec.trainable ? 0 : q.value.numel();
  EXPECT_EQ(frozen, p.frozen);
  model.backward();
  EXPECT_EQ(model.activation_bytes(), 0);
}

TEST(PlanModel, ActivationsAndParametersOfMoeLayers) { expect_model_matches(small_model(), 2, 5); }

// Attention FLOPs with a sliding window: the difference to plain causal attention is the
// score and PV products of the keys the window hides, counted query by query.
TEST(PlanModel, SlidingWindowCountsTheKeysItKeeps) {
  ModelConfig cfg = small_model();
  const PlanLayout layout{.micro_batch = 2};
  const StepShape shape{2, 64};
  const ExpertRows rows{0, 0, 2.0 * 64 * cfg.top_k};
  const double plain = chunk_forward_flops(cfg, layout, shape, RankCoord{}, 0, rows);
  cfg.sliding_window = 16;
  const double windowed = chunk_forward_flops(cfg, layout, shape, RankCoord{}, 0, rows);
  double hidden = 0;  // keys per row: causal T/2 on average (as the planner counts) minus min(i + 1, W)
  for (int i = 0; i < 64; ++i) hidden += 64.0 / 2 - std::min(i + 1, 16);
  EXPECT_DOUBLE_EQ(plain - windowed, 4.0 * 2 * hidden * cfg.n_heads * cfg.head_dim * cfg.n_layers);
  cfg.sliding_window = 64;  // a window of T hides nothing
  EXPECT_DOUBLE_EQ(chunk_forward_flops(cfg, layout, shape, RankCoord{}, 0, rows), plain);
}

TEST(PlanModel, RecomputeKeepsLayerInputs) {
  ModelConfig cfg = small_model();
  cfg.recompute = true;
  expect_model_matches(cfg, 3, 4);
}

TEST(PlanModel, DenseLayersSharedExpertsTiedEmbeddingsBias) {
  ModelConfig cfg = small_model();
  cfg.n_dense_layers = 1;
  cfg.n_shared_experts = 2;
  cfg.tie_embeddings = true;
  cfg.expert_bias_update_rate = 1e-3f;
  cfg.gating = ops::Gating::kSigmoidTopK;
  expect_model_matches(cfg, 1, 7);
}

TEST(PlanModel, PipelinePeakFollowsTheSchedule) {
  // 4 micro-batches per DP rank on pp 2: GPipe holds all 4 units, 1F1B holds pp - s.
  const ModelConfig cfg = small_model();
  const StepShape shape{8, 6};
  const ExpertRows rows{0, 0, 2.0 * 6 * 2};
  PlanLayout l{.pp = 2, .micro_batch = 2};
  const double unit0 = unit_activation_bytes(cfg, l, shape, RankCoord{0, 0, 0}, 0, Precision::cpu(), rows);
  EXPECT_DOUBLE_EQ(peak_activation_bytes(cfg, l, shape, RankCoord{0, 0, 0}, Precision::cpu(), rows), 2 * unit0);
  l.schedule = PipelineSchedule::kGPipe;
  EXPECT_DOUBLE_EQ(peak_activation_bytes(cfg, l, shape, RankCoord{0, 0, 0}, Precision::cpu(), rows), 4 * unit0);
}

// ---- cluster files ----

std::string error_of(const std::string& text) {
  try {
    parse_cluster(text, "c.pbtxt");
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "no error";
}

constexpr const char* kGood =
    "name: \"x\"\ngpus_per_node: 8\nmax_nodes: 4\ngpu_memory_gib: 80\npeak_tflops_bf16: 989\n"
    "compute_efficiency: 0.5\nhbm_gbps: 3350\nintra_node_gbps: 450\nintra_node_latency_us: 3\n"
    "inter_node_gbps: 50\ninter_node_latency_us: 6\n";

TEST(Cluster, ReadyFilesParse) {
  for (const char* f : {"cluster/h100-8x-ib400.pbtxt", "cluster/h200-8x-ib400.pbtxt", "cluster/rtx4090-workstation.pbtxt"}) {
    const Cluster c = load_cluster(testing::source_path(f));
    EXPECT_GT(c.peak_flops, 1e14) << f;
    EXPECT_GT(c.gpu_memory_bytes, 20e9) << f;
  }
  const Cluster c = parse_cluster(kGood, "c.pbtxt");
  EXPECT_EQ(c.gpus_per_node, 8);
  EXPECT_DOUBLE_EQ(c.inter_bytes_per_s, 50e9);
  EXPECT_DOUBLE_EQ(c.intra_latency_s, 3e-6);
}

TEST(Cluster, BadFilesNameFileLineAndField) {
  std::string text = kGood;
  text.replace(text.find("gpu_memory_gib: 80"), 18, "gpu_memory_gib: -80");
  EXPECT_EQ(error_of(text), "c.pbtxt:4: gpu_memory_gib: must be > 0, got -80");
  text = kGood;
  text.replace(text.find("compute_efficiency: 0.5"), 23, "compute_efficiency: 1.5");
  EXPECT_EQ(error_of(text), "c.pbtxt:6: compute_efficiency: must be in (0, 1], got 1.5");
  text = kGood;
  text.erase(text.find("inter_node_gbps: 50\n"), 20);
  EXPECT_EQ(error_of(text), "c.pbtxt: inter_node_gbps: required (per-GPU bandwidth between nodes, GB/s)");
  EXPECT_EQ(error_of(std::string(kGood) + "gpus: 8\n"),
            "c.pbtxt:12:5: Message type \"moeforge.config.ClusterConfig\" has no field named \"gpus\".");
  EXPECT_EQ(error_of("gpus_per_node: eight\n"),
            "c.pbtxt:1:16: Expected integer, got: eight");
  try {
    load_cluster("/nonexistent/cluster.pbtxt");
    FAIL() << "no error";
  } catch (const ConfigError& e) {
    EXPECT_EQ(std::string(e.what()), "/nonexistent/cluster.pbtxt: cannot read cluster file (No such file or directory)");
  }
}

// ---- the planner at scale ----

TEST(PlanSearch, MixtralAndOlmoeUpTo4096GpusInUnderTwoSeconds) {
  const Cluster h100 = load_cluster(testing::source_path("cluster/h100-8x-ib400.pbtxt"));
  for (const char* config : {"configs/mixtral-8x7b.pbtxt", "configs/olmoe-1b-7b.pbtxt"}) {
    const config::RunConfig run = load_plan_config(testing::source_path(config));
    for (int gpus : {8, 64, 512, 4096}) {
      const auto start = std::chrono::steady_clock::now();
      const PlanResult plan = plan_layouts(run, h100, gpus);
      const std::string table = format_plan(plan, run, h100);
      const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      std::printf("%s on %d GPUs: %zu layouts, %d feasible, %.3f s\n", config, gpus, plan.layouts.size(),
                  plan.feasible, seconds);
      EXPECT_LT(seconds, 2.0) << config << " on " << gpus;
      EXPECT_GT(plan.layouts.size(), 50u);
      for (const LayoutEstimate& e : plan.layouts) {
        if (!e.infeasible.empty()) continue;
        EXPECT_LE(e.memory(), h100.gpu_memory_bytes);
        EXPECT_GT(e.step_s, e.compute_s);
        EXPECT_GT(e.mfu, 0.0);
        EXPECT_LT(e.mfu, h100.compute_efficiency) << "MFU cannot beat the stated efficiency";
      }
      bool rule = false;  // some enumerated layouts break a rule of the config (divisibility, split)
      for (const LayoutEstimate& e : plan.layouts)
        rule = rule || (!e.infeasible.empty() && !e.infeasible.starts_with("out of memory"));
      EXPECT_TRUE(rule);
      if (gpus >= 64) {
        EXPECT_GT(plan.feasible, 0) << config << " on " << gpus;
      }
      EXPECT_NE(table.find("infeasible layouts by rule:"), std::string::npos);
    }
  }
}

TEST(PlanSearch, MixtralDoesNotFitOneH100NodeAndSaysWhy) {
  // 46.7B parameters at 2 + 4 bytes plus sharded fp32 Adam state exceed 8 x 76 GiB.
  const Cluster h100 = load_cluster(testing::source_path("cluster/h100-8x-ib400.pbtxt"));
  const config::RunConfig run = load_plan_config(testing::source_path("configs/mixtral-8x7b.pbtxt"));
  const PlanResult plan = plan_layouts(run, h100, 8);
  EXPECT_EQ(plan.feasible, 0);
  int oom = 0;
  for (const LayoutEstimate& e : plan.layouts) oom += e.infeasible.starts_with("out of memory") ? 1 : 0;
  EXPECT_GT(oom, 0);
  const nlohmann::json j = plan_json(plan, h100);
  EXPECT_EQ(j["layouts"].size(), plan.layouts.size());
  EXPECT_EQ(j["layouts"][0]["feasible"], false);
  EXPECT_TRUE(j["layouts"][0].contains("reason"));
}

// ---- the subcommand ----

std::string moeforge_bin() {
  const char* env = std::getenv("MOEFORGE_BIN");
  return env ? env : "launch/moeforge";
}

TEST(PlanCommand, PrintsTableWritesJsonAndRejectsBadClusters) {
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / "moeforge_plan_cli";
  fs::remove_all(dir);
  fs::create_directories(dir);
  const std::string json = (dir / "plan.json").string();
  const std::string base = moeforge_bin() + " plan --config " + testing::source_path("configs/olmoe-1b-7b.pbtxt");
  const auto ok = testing::run_command(base + " --cluster " + testing::source_path("cluster/h200-8x-ib400.pbtxt") +
                                       " --gpus 64 --json " + json + " 2>&1");
  ASSERT_EQ(ok.exit_code, 0) << ok.output;
  EXPECT_NE(ok.output.find("on 64 GPUs of H200"), std::string::npos) << ok.output;
  EXPECT_NE(ok.output.find("tok/s/gpu"), std::string::npos) << ok.output;
  std::ifstream in(json);
  const nlohmann::json j = nlohmann::json::parse(in);
  EXPECT_EQ(j["gpus"], 64);
  ASSERT_GT(j["layouts"].size(), 0u);
  EXPECT_EQ(j["layouts"][0]["feasible"], true);
  EXPECT_GT(j["layouts"][0]["tokens_per_s_per_gpu"].get<double>(), 0.0);

  const std::string bad = (dir / "bad.pbtxt").string();
  std::ofstream(bad) << "name: \"b\"\ngpus_per_node: 0\n";
  const auto err = testing::run_command(base + " --cluster " + bad + " 2>&1");
  EXPECT_EQ(err.exit_code, 2);
  EXPECT_EQ(err.output, "moeforge: config error: " + bad + ":2: gpus_per_node: must be > 0, got 0\n");
  const auto big = testing::run_command(base + " --cluster " +
                                        testing::source_path("cluster/rtx4090-workstation.pbtxt") + " --gpus 2 2>&1");
  EXPECT_EQ(big.exit_code, 2);
  EXPECT_NE(big.output.find("2 GPUs requested, the cluster 'RTX 4090 24GB workstation' has 1"), std::string::npos)
      << big.output;
  fs::remove_all(dir);
}

}  // namespace
}  // namespace moeforge
