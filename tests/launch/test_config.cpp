// Tests launch/config.cpp: the ready configs parse and validate at their stated world sizes and
// have the parameter counts their header comments state (counted from the ModelConfig built from
// them; the counting formula is checked against the parameter registry); defaults and derived
// defaults; overrides of every field type; the exact one-line message of each kind of bad config;
// model_config_from's field mapping; to_text's round trip.
#include <gtest/gtest.h>

#include <algorithm>
#include <fstream>
#include <regex>
#include <string>
#include <vector>

#include "launch/config.h"
#include "models/transformer.h"
#include "tests/data/temp_dir.h"
#include "tests/testing.h"

namespace moeforge {
namespace {

using config::RunConfig;

// The smallest valid config: everything else is a default.
const char* const kMinimal = "data { train: \"d\" }\n";

// The message of the ConfigError that parsing `text` as "bad.pbtxt" raises, or "<no error>".
std::string config_error(const std::string& text, const std::vector<std::string>& overrides = {}, int world = 1) {
  try {
    parse_run_config(text, "bad.pbtxt", overrides, world);
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "<no error>";
}

// ---- parameter counts ---------------------------------------------------------------------------

// Every parameter the MoE transformer registers (models/transformer.cpp, attention.cpp,
// moe_block.cpp), written out: embedding and LM head (V, C) unless tied, final norm (C); per
// layer two norms (C), wq and wo (H*D, C), wk and wv (Hkv*D, C), router (E, C), routed experts
// 3 x (E, F, C), shared experts 3 x (S*F, C).
int64_t total_params(const ModelConfig& m) {
  const int64_t C = m.dim, V = m.vocab_size, HD = m.n_heads * m.head_dim, KD = m.n_kv_heads * m.head_dim;
  const int64_t attn = C + 2 * HD * C + 2 * KD * C;
  const int64_t moe =
      C + m.n_experts * C + 3 * m.n_experts * m.expert_hidden * C + 3 * m.n_shared_experts * m.expert_hidden * C;
  return V * C * (m.tie_embeddings ? 1 : 2) + C + m.n_layers * (attn + moe);
}

// A token passes through top_k of the n_experts routed experts.
int64_t active_params(const ModelConfig& m) {
  return total_params(m) - int64_t{m.n_layers} * (m.n_experts - m.top_k) * 3 * m.expert_hidden * m.dim;
}

// The "# parameters: N total (...), M active per token" line of a ready config's header.
std::pair<int64_t, int64_t> stated_params(const std::string& path) {
  const std::string text = testing::read_file(path);
  std::smatch match;
  const std::regex line(R"(# parameters: (\d+) total \([^)]*\), (\d+) active per token)");
  EXPECT_TRUE(std::regex_search(text, match, line)) << path << " states no parameter count";
  if (match.empty()) return {-1, -1};
  return {std::stoll(match[1]), std::stoll(match[2])};
}

struct Preset {
  const char* name;
  int world_size;
  int expected_dp;
};

TEST(ConfigPresets, ValidateAtTheirWorldSizeWithTheStatedParameterCounts) {
  for (const Preset& p :
       {Preset{"tiny", 1, 1}, Preset{"small", 1, 1}, Preset{"mixtral-8x7b", 64, 8}, Preset{"olmoe-1b-7b", 32, 32}}) {
    SCOPED_TRACE(p.name);
    const std::string path = testing::source_path(std::string("configs/") + p.name + ".pbtxt");
    const RunConfig run = load_run_config(path, {}, p.world_size);
    EXPECT_EQ(run.parallel().dp(), p.expected_dp);
    const ModelConfig m = model_config_from(run);
    EXPECT_NO_THROW(m.validate());
    const auto [total, active] = stated_params(path);
    EXPECT_EQ(total_params(m), total);
    EXPECT_EQ(active_params(m), active);
  }
}

TEST(ConfigPresets, StatedCountsAreTheKnownModelSizes) {
  // Mixtral-8x7B is published as 46.7B total / 12.9B active, OLMoE-1B-7B as 6.9B / 1.3B
  // (OLMoE's QK-norm adds 65536 weights we do not model); small is meant to be about 100M.
  const auto mixtral = stated_params(testing::source_path("configs/mixtral-8x7b.pbtxt"));
  EXPECT_EQ(mixtral.first, 46702792704);
  EXPECT_EQ(mixtral.second, 12879925248);
  const auto olmoe = stated_params(testing::source_path("configs/olmoe-1b-7b.pbtxt"));
  EXPECT_EQ(olmoe.first, 6919096320);
  EXPECT_EQ(olmoe.second, 1281951744);
  const auto small = stated_params(testing::source_path("configs/small.pbtxt"));
  EXPECT_EQ(small.first, 107261440);
  const auto tiny = stated_params(testing::source_path("configs/tiny.pbtxt"));
  EXPECT_EQ(tiny.first, 3413888);
}

TEST(ConfigPresets, CountingFormulaMatchesTheRegistry) {
  const std::string tiny = testing::source_path("configs/tiny.pbtxt");
  // The preset itself, then the formula's other branches: shared experts, tied embeddings.
  for (const std::vector<std::string>& overrides :
       {std::vector<std::string>{}, {"model.n_shared_experts=2", "model.tie_embeddings=true", "model.head_dim=16"}}) {
    const MoeTransformer model(model_config_from(load_run_config(tiny, overrides)));
    EXPECT_EQ(model.registry().global_numel(), total_params(model.config()));
  }
  const MoeTransformer small(model_config_from(load_run_config(testing::source_path("configs/small.pbtxt"), {})));
  EXPECT_EQ(small.registry().global_numel(), total_params(small.config()));
}

TEST(ConfigPresets, MixtralLayoutRejectsOtherWorldSizes) {
  const std::string path = testing::source_path("configs/mixtral-8x7b.pbtxt");
  const std::string text = testing::read_file(path);
  const size_t dp_at = text.find("  dp: 8");
  ASSERT_NE(dp_at, std::string::npos) << path;
  const int dp_line = 1 + static_cast<int>(std::count(text.begin(), text.begin() + static_cast<ptrdiff_t>(dp_at), '\n'));
  try {
    load_run_config(path, {}, 32);
    ADD_FAILURE() << "world size 32 accepted";
  } catch (const ConfigError& e) {
    EXPECT_EQ(std::string(e.what()), path + ":" + std::to_string(dp_line) +
                                         ": parallel.dp: parallel.tp * parallel.pp * parallel.dp = 2 * 4 * 8 = 64 "
                                         "does not equal the world size 32");
  }
}

// ---- defaults and overrides ---------------------------------------------------------------------

TEST(ConfigDefaults, SchemaDefaultsAndDerivedValues) {
  const RunConfig run = parse_run_config(kMinimal, "min.pbtxt", {}, 1);
  EXPECT_EQ(run.model().vocab_size(), 259);
  EXPECT_EQ(run.model().dim(), 256);
  EXPECT_EQ(run.model().n_heads(), 8);
  EXPECT_EQ(run.model().head_dim(), 32);  // derived: dim / n_heads
  EXPECT_EQ(run.model().gating(), config::ModelConfig::SOFTMAX_TOPK);
  EXPECT_FLOAT_EQ(run.model().rope_theta(), 10000.0f);
  EXPECT_EQ(run.parallel().tp(), 1);
  EXPECT_EQ(run.parallel().dp(), 1);  // derived: world / (tp * pp)
  EXPECT_EQ(run.train().seed(), 1234u);
  EXPECT_EQ(run.train().sample_prompt(), "The ");
  EXPECT_EQ(run.optim().schedule(), config::OptimConfig::COSINE);
  EXPECT_FLOAT_EQ(run.optim().lr(), 3e-4f);
  EXPECT_EQ(run.checkpoint().keep_last(), 3);
  EXPECT_EQ(run.logging().dir(), "runs/latest");
  EXPECT_TRUE(run.logging().tensorboard());

  EXPECT_EQ(parse_run_config(kMinimal, "min.pbtxt", {}, 4).parallel().dp(), 4);
  EXPECT_EQ(parse_run_config(kMinimal, "min.pbtxt", {"model.vocab_size=260", "parallel.tp=2"}, 4).parallel().dp(), 2);
  // An explicit head_dim is kept even when it differs from dim / n_heads.
  EXPECT_EQ(parse_run_config(kMinimal, "min.pbtxt", {"model.head_dim=48"}).model().head_dim(), 48);
}

TEST(ConfigOverrides, EveryFieldType) {
  const RunConfig run = parse_run_config("model { n_layers: 3 }\ndata { train: \"d\" }\n", "o.pbtxt",
                                         {"model.n_layers=6",                       // int32, over the file
                                          "train.steps=123",                        // int64
                                          "train.seed=18446744073709551615",        // uint64 max
                                          "optim.lr=1e-3",                          // float
                                          "model.tie_embeddings=true",              // bool
                                          "logging.jsonl=0",                        // bool as 0/1
                                          "train.sample_prompt=Once upon a time=",  // string, keeps its '='
                                          "optim.schedule=WSD",                     // enum
                                          "model.gating=SIGMOID_TOPK",              // enum
                                          "parallel.zero_stage=1",                  // nested message
                                          "data.train=elsewhere", "train.threads=2", "model.n_layers=7"},
                                         1);
  EXPECT_EQ(run.model().n_layers(), 7);  // the later override wins
  EXPECT_EQ(run.train().steps(), 123);
  EXPECT_EQ(run.train().seed(), 18446744073709551615ull);
  EXPECT_FLOAT_EQ(run.optim().lr(), 1e-3f);
  EXPECT_TRUE(run.model().tie_embeddings());
  EXPECT_FALSE(run.logging().jsonl());
  EXPECT_EQ(run.train().sample_prompt(), "Once upon a time=");
  EXPECT_EQ(run.optim().schedule(), config::OptimConfig::WSD);
  EXPECT_EQ(run.model().gating(), config::ModelConfig::SIGMOID_TOPK);
  EXPECT_EQ(run.parallel().zero_stage(), 1);
  EXPECT_EQ(run.data().train(), "elsewhere");
  EXPECT_EQ(run.train().threads(), 2);
}

// ---- bad configs: the exact message -----------------------------------------------------------

TEST(ConfigErrors, Syntax) {
  EXPECT_EQ(config_error("model {\n  dim: abc\n}\n"), "bad.pbtxt:2:8: Expected integer, got: abc");
  EXPECT_EQ(config_error("model {\n  topk: 2\n}\n"),
            "bad.pbtxt:2:3: Message type \"moeforge.config.ModelConfig\" has no field named \"topk\".");
  EXPECT_EQ(config_error("# a comment\nmodel {\n  gating: SOFTMAX\n}\n"),
            "bad.pbtxt:3:11: Unknown enumeration value of \"SOFTMAX\" for field \"gating\".");
  // Columns count a tab as protobuf's tokenizer does: to the next multiple of 8.
  EXPECT_EQ(config_error("model {\n\ttopk: 2\n}\n"),
            "bad.pbtxt:2:9: Message type \"moeforge.config.ModelConfig\" has no field named \"topk\".");
  EXPECT_EQ(config_error("model {\n  dim: 64\n  dim: 128\n}\n"),
            "bad.pbtxt:3:3: Non-repeated field \"dim\" is specified multiple times.");
  EXPECT_EQ(config_error("model {\n  n_layers: 3000000000\n}\n"), "bad.pbtxt:2:13: Integer out of range (3000000000)");
  EXPECT_EQ(config_error("model {\n  dim: 64\n"), "bad.pbtxt:3:1: Expected identifier, got: ");
  EXPECT_EQ(config_error("trian { steps: 1 }\n"),
            "bad.pbtxt:1:1: Message type \"moeforge.config.RunConfig\" has no field named \"trian\".");
}

TEST(ConfigErrors, SyntaxErrorsDoNotLogToStderr) {
  ::testing::internal::CaptureStderr();
  EXPECT_NE(config_error("model {\n  topk: 2\n}\n"), "<no error>");
  EXPECT_EQ(::testing::internal::GetCapturedStderr(), "");
}

TEST(ConfigErrors, ModelFields) {
  EXPECT_EQ(config_error("model {\n  n_heads: 12\n  n_kv_heads: 5\n}\ndata { train: \"d\" }\n"),
            "bad.pbtxt:2: model.n_heads: 12 is not divisible by model.n_kv_heads = 5");
  EXPECT_EQ(
      config_error("model { vocab_size: 256 }\ndata { train: \"d\" }\n"),
      "bad.pbtxt:1: model.vocab_size: must be at least 259 (the byte-level tokenizer's 256 bytes + BOS, EOS, PAD), "
      "got 256");
  EXPECT_EQ(config_error(kMinimal, {"model.dim=0"}), "--set model.dim=0: model.dim: must be > 0, got 0");
  EXPECT_EQ(config_error(kMinimal, {"model.head_dim=33"}),
            "--set model.head_dim=33: model.head_dim: must be even (RoPE rotates pairs of features), got 33");
  EXPECT_EQ(config_error(kMinimal, {"model.dim=100"}),
            "--set model.dim=100: model.dim: 100 is not divisible by model.n_heads = 8 (model.head_dim is 0, meaning "
            "dim / n_heads)");
  EXPECT_EQ(config_error("model {\n  dim: 120\n}\ndata { train: \"d\" }\n"),
            "bad.pbtxt:2: model.head_dim: model.dim / model.n_heads = 120 / 8 = 15 must be even (RoPE rotates pairs of "
            "features)");
  // The rule names top_k; the place is the override that broke it.
  EXPECT_EQ(config_error("model {\n  top_k: 4\n}\ndata { train: \"d\" }\n", {"model.n_experts=2"}),
            "--set model.n_experts=2: model.top_k: must be in [1, model.n_experts = 2], got 4");
  EXPECT_EQ(config_error(kMinimal, {"model.rope_theta=-1"}),
            "--set model.rope_theta=-1: model.rope_theta: must be > 0, got -1");
  EXPECT_EQ(config_error("model { n_shared_experts: -1 }\ndata { train: \"d\" }\n"),
            "bad.pbtxt:1: model.n_shared_experts: must be >= 0, got -1");
  EXPECT_EQ(config_error("model {\n  norm_eps: nan\n}\ndata { train: \"d\" }\n"),
            "bad.pbtxt:2: model.norm_eps: must be > 0, got nan");
  EXPECT_EQ(config_error(kMinimal, {"model.sliding_window=-4"}),
            "--set model.sliding_window=-4: model.sliding_window: must be >= 0, got -4");
  EXPECT_EQ(config_error(kMinimal, {"model.document_start_token=259"}),
            "--set model.document_start_token=259: model.document_start_token: must be -1 (off) or a token id in "
            "[0, model.vocab_size = 259), got 259");
}

TEST(ConfigErrors, ParallelLayout) {
  EXPECT_EQ(config_error("parallel {\n  tp: 2\n  pp: 3\n}\ndata { train: \"d\" }\n", {}, 8),
            "bad.pbtxt:2: parallel.tp: parallel.tp * parallel.pp = 2 * 3 = 6 does not divide the world size 8");
  EXPECT_EQ(config_error(kMinimal, {"parallel.dp=3"}, 4),
            "--set parallel.dp=3: parallel.dp: parallel.tp * parallel.pp * parallel.dp = 1 * 1 * 3 = 3 does not equal "
            "the world size 4");
  EXPECT_EQ(config_error(kMinimal, {"parallel.ep=4"}, 2),
            "--set parallel.ep=4: parallel.ep: 4 does not divide parallel.tp * parallel.dp = 1 * 2 = 2");
  EXPECT_EQ(config_error("model { n_experts: 6 }\nparallel { ep: 4 }\ndata { train: \"d\" }\n", {}, 4),
            "bad.pbtxt:2: parallel.ep: 4 does not divide model.n_experts = 6");
  EXPECT_EQ(config_error(kMinimal, {"parallel.pp=8"}, 8),
            "--set parallel.pp=8: parallel.pp: parallel.pp * parallel.virtual_stages = 8 * 1 = 8 model chunks exceed "
            "model.n_layers = 4 (every chunk needs a layer)");
  EXPECT_EQ(config_error(kMinimal, {"parallel.pp=2", "parallel.virtual_stages=3", "parallel.pp_schedule=INTERLEAVED_1F1B"}, 2),
            "--set parallel.virtual_stages=3: parallel.pp: parallel.pp * parallel.virtual_stages = 2 * 3 = 6 model chunks exceed "
            "model.n_layers = 4 (every chunk needs a layer)");
  EXPECT_EQ(config_error("model { n_layers: 6 }\nparallel { pp: 2 virtual_stages: 2 pp_schedule: INTERLEAVED_1F1B }\n"
                         "train { global_batch: 32 micro_batch: 8 }\ndata { train: \"d\" }\n",
                         {}, 2),
            "bad.pbtxt:2: parallel.virtual_stages: parallel.virtual_stages = 2 does not divide the layers: model.n_layers = 6 is not "
            "a multiple of parallel.pp * parallel.virtual_stages = 4; set parallel.pp_split for an uneven split");
  EXPECT_EQ(config_error(kMinimal, {"parallel.pp=2", "parallel.pp_split=3,2"}, 2),
            "--set parallel.pp_split=3,2: parallel.pp_split: parallel.pp_split \"3,2\" sums to 5 layers but "
            "model.n_layers = 4");
  EXPECT_EQ(config_error(kMinimal, {"parallel.pp=2", "parallel.pp_split=3,x"}, 2),
            "--set parallel.pp_split=3,x: parallel.pp_split: parallel.pp_split \"3,x\": \"x\" is not a positive layer "
            "count");
  EXPECT_EQ(config_error(kMinimal, {"parallel.virtual_stages=2"}, 1),
            "--set parallel.virtual_stages=2: parallel.pp_schedule: parallel.virtual_stages = 2 needs pp_schedule: "
            "INTERLEAVED_1F1B");
  EXPECT_EQ(
      config_error("model { n_heads: 6 n_kv_heads: 2 dim: 384 }\nparallel { tp: 4 }\ndata { train: \"d\" }\n", {}, 4),
      "bad.pbtxt:2: parallel.tp: 4 does not divide model.n_heads = 6");
  EXPECT_EQ(config_error("model { n_kv_heads: 2 }\nparallel { tp: 4 }\ndata { train: \"d\" }\n", {}, 4),
            "bad.pbtxt:2: parallel.tp: 4 does not divide model.n_kv_heads = 2");
  EXPECT_EQ(config_error(kMinimal,
                         {"model.n_heads=6", "model.n_kv_heads=3", "model.dim=384", "parallel.tp=3"}, 3),
            "--set parallel.tp=3: parallel.tp: 3 does not divide the 2048 tokens of a micro-batch "
            "(train.micro_batch * train.seq_len; sequence parallelism splits them over TP)");
  EXPECT_EQ(config_error(kMinimal, {"parallel.zero_stage=2"}),
            "--set parallel.zero_stage=2: parallel.zero_stage: must be 0 or 1, got 2");
  EXPECT_EQ(config_error(kMinimal, {"parallel.collective_timeout_s=0"}),
            "--set parallel.collective_timeout_s=0: parallel.collective_timeout_s: must be > 0, got 0");
}

TEST(ConfigErrors, TrainAndOptim) {
  EXPECT_EQ(config_error("model { max_seq_len: 256 }\ntrain {\n  seq_len: 512\n}\ndata { train: \"d\" }\n"),
            "bad.pbtxt:3: train.seq_len: must be in [1, model.max_seq_len = 256], got 512");
  EXPECT_EQ(config_error("train {\n  global_batch: 30\n}\ndata { train: \"d\" }\n"),
            "bad.pbtxt:2: train.global_batch: 30 is not divisible by train.micro_batch = 8");
  EXPECT_EQ(config_error("train {\n  global_batch: 24\n}\ndata { train: \"d\" }\n", {}, 2),
            "bad.pbtxt:2: train.global_batch: 24 is not divisible by train.micro_batch * parallel.dp = 8 * 2 = 16");
  // Nothing involved was set: the defaults are at fault at this world size.
  EXPECT_EQ(config_error(kMinimal, {}, 8),
            "bad.pbtxt: train.global_batch: 32 is not divisible by train.micro_batch * parallel.dp = 8 * 8 = 64 "
            "(default value)");
  EXPECT_EQ(config_error(kMinimal, {"train.steps=0"}), "--set train.steps=0: train.steps: must be > 0, got 0");
  EXPECT_EQ(config_error(kMinimal, {"train.sample_temperature=-0.5"}),
            "--set train.sample_temperature=-0.5: train.sample_temperature: must be >= 0, got -0.5");
  EXPECT_EQ(config_error("optim {\n  lr: 1e-3\n  min_lr: 2e-3\n}\ndata { train: \"d\" }\n"),
            "bad.pbtxt:3: optim.min_lr: must be in [0, optim.lr = 0.001], got 0.002");
  // warmup_steps keeps its default; the place is train.steps, which made it too long.
  EXPECT_EQ(config_error("train {\n  steps: 50\n}\ndata { train: \"d\" }\n"),
            "bad.pbtxt:2: optim.warmup_steps: must be in [0, train.steps = 50], got 100");
  EXPECT_EQ(config_error(kMinimal, {"optim.beta2=1"}), "--set optim.beta2=1: optim.beta2: must be in [0, 1), got 1");
  EXPECT_EQ(config_error(kMinimal, {"optim.decay_fraction=0"}),
            "--set optim.decay_fraction=0: optim.decay_fraction: must be in (0, 1], got 0");
  EXPECT_EQ(config_error(kMinimal, {"optim.eps=-1e-8"}), "--set optim.eps=-1e-8: optim.eps: must be > 0, got -1e-08");
}

// train.attention_kernel: a choice other than AUTO needs the GPU, bf16 and, for CUDNN, a build
// with cuDNN; each rule names the fields.
TEST(ConfigErrors, AttentionKernel) {
  EXPECT_EQ(config_error(kMinimal, {"train.attention_kernel=CUDNN"}),
            "--set train.attention_kernel=CUDNN: train.attention_kernel: CUDNN selects a kernel of the fused GPU "
            "attention and needs train.device: CUDA, got CPU");
  EXPECT_EQ(config_error("train {\n  device: CUDA\n  attention_kernel: MMA\n}\ndata { train: \"d\" }\n"),
            "bad.pbtxt:3: train.attention_kernel: MMA selects a kernel of the fused bf16 attention and needs "
            "train.precision: BF16, got FP32 (fp32 attention runs the exact fp32 kernels)");
  // The rule points at the field set last: here the precision.
  EXPECT_EQ(config_error("train {\n  device: CUDA\n  attention_kernel: WGMMA\n}\ndata { train: \"d\" }\n",
                         {"train.precision=FP32"}),
            "--set train.precision=FP32: train.attention_kernel: WGMMA selects a kernel of the fused bf16 attention "
            "and needs train.precision: BF16, got FP32 (fp32 attention runs the exact fp32 kernels)");
  const std::vector<std::string> gpu_bf16{"train.device=CUDA", "train.precision=BF16"};
  for (const char* kernel : {"AUTO", "MMA", "WGMMA"}) {
    std::vector<std::string> set = gpu_bf16;
    set.push_back(std::string("train.attention_kernel=") + kernel);
    EXPECT_EQ(config_error(kMinimal, set), "<no error>") << kernel;
  }
  std::vector<std::string> cudnn = gpu_bf16;
  cudnn.push_back("train.attention_kernel=CUDNN");
  EXPECT_EQ(config_error(kMinimal, cudnn),
            cuda::cudnn_attention_built()
                ? std::string("<no error>")
                : std::string("--set train.attention_kernel=CUDNN: train.attention_kernel: CUDNN needs a moeforge "
                              "built with cuDNN 9 (the CUDA backend with cudnn.h and libcudnn found at configure "
                              "time); this one was built without it"));
  cudnn.push_back("model.document_start_token=256");
  EXPECT_EQ(config_error(kMinimal, cudnn),
            "--set model.document_start_token=256: train.attention_kernel: CUDNN runs no packed documents (cuDNN's "
            "fused attention here has no variable-length mode); use AUTO or set model.document_start_token: -1");
  EXPECT_EQ(config_error(kMinimal, {"train.attention_kernel=FAST"}),
            "--set train.attention_kernel=FAST: not a value of moeforge.config.TrainConfig.AttentionKernel (AUTO, "
            "MMA, WGMMA, CUDNN)");
  // The default leaves the choice to the runtime (and to MOEFORGE_ATTENTION_KERNEL).
  EXPECT_EQ(config_error(kMinimal, {"train.attention_kernel=MMA", "train.attention_kernel=AUTO"}), "<no error>");
}

TEST(AttentionKernelFrom, MapsEveryValueWithItsOrigin) {
  RunConfig run;
  EXPECT_EQ(attention_kernel_from(run).kernel, cuda::AttentionKernel::kAuto);
  EXPECT_EQ(attention_kernel_from(run).origin, "");
  const struct {
    config::TrainConfig::AttentionKernel value;
    cuda::AttentionKernel kernel;
    const char* origin;
  } cases[] = {{config::TrainConfig::MMA, cuda::AttentionKernel::kMma, "train.attention_kernel: MMA"},
               {config::TrainConfig::WGMMA, cuda::AttentionKernel::kWgmma, "train.attention_kernel: WGMMA"},
               {config::TrainConfig::CUDNN, cuda::AttentionKernel::kCudnn, "train.attention_kernel: CUDNN"}};
  for (const auto& c : cases) {
    run.mutable_train()->set_attention_kernel(c.value);
    EXPECT_EQ(attention_kernel_from(run).kernel, c.kernel) << c.origin;
    EXPECT_EQ(attention_kernel_from(run).origin, c.origin);
  }
}

TEST(ConfigErrors, DataCheckpointLogging) {
  EXPECT_EQ(config_error(""), "bad.pbtxt: data.train: required (a directory written by `moeforge data prepare`)");
  EXPECT_EQ(config_error("data {\n  train: \"\"\n}\n"),
            "bad.pbtxt:2: data.train: required (a directory written by `moeforge data prepare`)");
  EXPECT_EQ(config_error(kMinimal, {"checkpoint.keep_last=0"}),
            "--set checkpoint.keep_last=0: checkpoint.keep_last: must be >= 1, got 0");
  EXPECT_EQ(config_error(kMinimal, {"logging.dir="}),
            "--set logging.dir=: logging.dir: required while logging.jsonl or logging.tensorboard is on");
  EXPECT_EQ(config_error(kMinimal, {"logging.dir=", "logging.jsonl=false", "logging.tensorboard=false"}), "<no error>");
}

TEST(ConfigErrors, Overrides) {
  EXPECT_EQ(config_error(kMinimal, {"model.topk=2"}),
            "--set model.topk=2: unknown field \"topk\" in moeforge.config.ModelConfig");
  EXPECT_EQ(config_error(kMinimal, {"modle.dim=2"}),
            "--set modle.dim=2: unknown field \"modle\" in moeforge.config.RunConfig");
  EXPECT_EQ(config_error(kMinimal, {"model.top_k=abc"}), "--set model.top_k=abc: not an integer");
  EXPECT_EQ(config_error(kMinimal, {"model.top_k=2.5"}), "--set model.top_k=2.5: not an integer");
  EXPECT_EQ(config_error(kMinimal, {"model.top_k"}), "--set model.top_k: expected path.to.field=value");
  EXPECT_EQ(config_error(kMinimal, {"=3"}), "--set =3: expected path.to.field=value");
  EXPECT_EQ(config_error(kMinimal, {"model.n_layers=3000000000"}),
            "--set model.n_layers=3000000000: out of range for int32");
  EXPECT_EQ(config_error(kMinimal, {"train.steps=9223372036854775808"}),
            "--set train.steps=9223372036854775808: out of range for int64");
  EXPECT_EQ(config_error(kMinimal, {"train.seed=-1"}), "--set train.seed=-1: not a non-negative integer");
  EXPECT_EQ(config_error(kMinimal, {"optim.lr=1e60"}), "--set optim.lr=1e60: out of range for float");
  EXPECT_EQ(config_error(kMinimal, {"optim.lr=fast"}), "--set optim.lr=fast: not a number");
  EXPECT_EQ(config_error(kMinimal, {"optim.lr=nan"}), "--set optim.lr=nan: not a finite number");
  EXPECT_EQ(config_error(kMinimal, {"model.tie_embeddings=yes"}),
            "--set model.tie_embeddings=yes: not a bool (true, false, 1 or 0)");
  EXPECT_EQ(config_error(kMinimal, {"optim.schedule=cosine"}),
            "--set optim.schedule=cosine: not a value of moeforge.config.OptimConfig.Schedule (COSINE, WSD, CONSTANT)");
  EXPECT_EQ(config_error(kMinimal, {"model=3"}),
            "--set model=3: \"model\" is a message; set one of its fields, e.g. model.vocab_size");
  EXPECT_EQ(config_error(kMinimal, {"model.dim.x=3"}),
            "--set model.dim.x=3: \"dim\" is a field of type int64, not a message");
}

TEST(ConfigErrors, LastPlaceThatSetAValueIsReported) {
  const std::string text = "model {\n  top_k: 2\n}\ndata { train: \"d\" }\n";
  // Both overrides set n_experts; the last one is the place.
  EXPECT_EQ(config_error(text, {"model.n_experts=16", "model.top_k=20"}),
            "--set model.top_k=20: model.top_k: must be in [1, model.n_experts = 16], got 20");
  EXPECT_EQ(config_error(text, {"model.top_k=20", "model.n_experts=16"}),
            "--set model.n_experts=16: model.top_k: must be in [1, model.n_experts = 16], got 20");
  EXPECT_EQ(config_error("model {\n  top_k: 9\n}\ndata { train: \"d\" }\n", {"model.dim=512"}),
            "bad.pbtxt:2: model.top_k: must be in [1, model.n_experts = 8], got 9");
}

TEST(ConfigErrors, Files) {
  testing::TempDir dir;
  EXPECT_EQ(testing::error_of([&] { load_run_config(dir / "missing.pbtxt", {}); }),
            dir / "missing.pbtxt" + ": cannot read config file (No such file or directory)");
  EXPECT_EQ(testing::error_of([&] { load_run_config(dir.str(), {}); }),
            dir.str() + ": cannot read config file (Is a directory)");
  const std::string path = dir / "run.pbtxt";
  testing::write_file(path, "# header\n\nmodel {\n  n_kv_heads: 3\n}\ndata { train: \"d\" }\n");
  EXPECT_EQ(testing::error_of([&] { load_run_config(path, {}); }),
            path + ":4: model.n_heads: 8 is not divisible by model.n_kv_heads = 3");
  EXPECT_EQ(load_run_config(path, {"model.n_kv_heads=4"}).model().n_kv_heads(), 4);
}

// ---- model_config_from and to_text ------------------------------------------------------------

TEST(ModelConfigFrom, MapsEveryField) {
  const RunConfig run = parse_run_config(
      "model { vocab_size: 300 dim: 96 n_layers: 3 n_heads: 6 n_kv_heads: 3 n_experts: 5 top_k: 3 "
      "expert_hidden: 40 n_shared_experts: 1 gating: SIGMOID_TOPK rope_theta: 5e5 norm_eps: 1e-6 "
      "tie_embeddings: true aux_loss_coef: 0.03 z_loss_coef: 0.002 init_std: 0.01 recompute: true "
      "sliding_window: 512 document_start_token: 256 }\n"
      "data { train: \"d\" }\n",
      "m.pbtxt", {});
  const ModelConfig m = model_config_from(run);
  EXPECT_EQ(m.vocab_size, 300);
  EXPECT_EQ(m.dim, 96);
  EXPECT_EQ(m.n_layers, 3);
  EXPECT_EQ(m.n_heads, 6);
  EXPECT_EQ(m.n_kv_heads, 3);
  EXPECT_EQ(m.head_dim, 16);
  EXPECT_EQ(m.n_experts, 5);
  EXPECT_EQ(m.top_k, 3);
  EXPECT_EQ(m.expert_hidden, 40);
  EXPECT_EQ(m.n_shared_experts, 1);
  EXPECT_EQ(m.gating, ops::Gating::kSigmoidTopK);
  EXPECT_FLOAT_EQ(m.rope_theta, 5e5f);
  EXPECT_FLOAT_EQ(m.norm_eps, 1e-6f);
  EXPECT_TRUE(m.tie_embeddings);
  EXPECT_FLOAT_EQ(m.aux_loss_coef, 0.03f);
  EXPECT_FLOAT_EQ(m.z_loss_coef, 0.002f);
  EXPECT_FLOAT_EQ(m.init_std, 0.01f);
  EXPECT_TRUE(m.recompute);
  EXPECT_EQ(m.sliding_window, 512);
  EXPECT_EQ(m.document_start_token, 256);

  // Not yet validated: head_dim 0 is still read as dim / n_heads; the default gating is softmax.
  RunConfig raw;
  raw.mutable_model()->set_dim(128);
  raw.mutable_model()->set_n_heads(4);
  EXPECT_EQ(model_config_from(raw).head_dim, 32);
  EXPECT_EQ(model_config_from(raw).gating, ops::Gating::kSoftmaxTopK);
}

TEST(ToText, RoundTripsTheWholeEffectiveConfig) {
  const RunConfig run = load_run_config(testing::source_path("configs/tiny.pbtxt"), {"optim.lr=0.0031415926"});
  const std::string text = to_text(run);
  // Defaults the file never mentions are written out too.
  EXPECT_NE(text.find("seed: 1234"), std::string::npos) << text;
  EXPECT_NE(text.find("dp: 1"), std::string::npos) << text;
  EXPECT_NE(text.find("schedule: COSINE"), std::string::npos) << text;
  const RunConfig back = parse_run_config(text, "to_text", {});
  EXPECT_EQ(back.optim().lr(), run.optim().lr());  // bit-exact float
  EXPECT_EQ(back.model().head_dim(), 32);
  EXPECT_EQ(back.data().train(), "quickstart-data/train");
  EXPECT_EQ(to_text(back), text);
}

}  // namespace
}  // namespace moeforge
