// Tests launch/trainer.cpp end to end on one process: `tiny` learns tinyshakespeare (validation
// loss below a measured threshold and far below the text's unigram entropy, first-step loss at
// ln V), runs are bitwise reproducible, gradient accumulation over micro-batches equals one big
// batch, the metrics files of a run hold the documented lines and TensorBoard's own reader agrees
// with them, and sampling is bounded and reproducible.
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/wait.h>

#include <array>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "data/byte_tokenizer.h"
#include "data/prepare.h"
#include "data/token_shard.h"
#include "launch/config.h"
#include "launch/trainer.h"
#include "optim/lr_schedule.h"
#include "parallel/process_grid.h"
#include "tests/data/temp_dir.h"
#include "tests/testing.h"

namespace moeforge {
namespace {

namespace fs = std::filesystem;
using config::RunConfig;

// A deterministic English-like corpus (~40 KB): sentences drawn from a small vocabulary, so a
// few steps already move the loss and every byte of it is printable ASCII or a newline.
std::string synthetic_corpus() {
  const std::vector<std::string> words = {"the", "king", "queen", "speaks", "to", "a", "fool", "and", "her",
                                          "his", "crown", "is", "gold", "night", "falls", "upon", "castle",
                                          "of", "dark", "stone", "with", "sword", "in", "hand"};
  std::mt19937 gen(11);
  std::string text;
  while (text.size() < 40000) {
    const int n = 4 + static_cast<int>(gen() % 8);
    std::string sentence;
    for (int i = 0; i < n; ++i) sentence += (i ? " " : "") + words[gen() % words.size()];
    sentence[0] = static_cast<char>(sentence[0] - 'a' + 'A');
    text += sentence + (gen() % 3 == 0 ? ".\n" : ". ");
  }
  return text;
}

// Tokenizes `input` into dir/data/{train,val} with a 10% validation split.
void prepare_data(const std::string& input, const testing::TempDir& dir) {
  data::PrepareOptions options;
  options.inputs = {input};
  options.output_dir = dir / "data";
  options.val_fraction = 0.1;
  data::prepare(options);
}

// configs/tiny.pbtxt on the data of `dir`, logging to dir/<run>, no printed sample, plus `extra`.
RunConfig tiny_config(const testing::TempDir& dir, const std::string& run, std::vector<std::string> extra) {
  std::vector<std::string> overrides = {"data.train=" + dir / "data/train", "data.val=" + dir / "data/val",
                                        "logging.dir=" + dir / run, "train.sample_tokens=0"};
  overrides.insert(overrides.end(), extra.begin(), extra.end());
  return load_run_config(testing::source_path("configs/tiny.pbtxt"), overrides);
}

std::vector<nlohmann::json> read_jsonl(const std::string& path) {
  std::ifstream f(path);
  std::vector<nlohmann::json> lines;
  for (std::string line; std::getline(f, line);) lines.push_back(nlohmann::json::parse(line));
  return lines;
}

// Entropy in nats of the token frequencies of a dataset: the loss of the best model that ignores
// context.
double unigram_entropy(const data::TokenDataset& ds) {
  std::vector<int32_t> tokens(static_cast<size_t>(ds.size()));
  ds.copy(0, ds.size(), tokens.data());
  std::map<int32_t, int64_t> counts;
  for (int32_t t : tokens) ++counts[t];
  double h = 0.0;
  for (const auto& [token, count] : counts) {
    const double p = static_cast<double>(count) / static_cast<double>(tokens.size());
    h -= p * std::log(p);
  }
  return h;
}

// ---- learning ---------------------------------------------------------------------------------

// Steps of `tiny` (16 x 128 tokens each, ~0.18 s per step on 2 idle cores: about 50 s in all).
constexpr int64_t kShakespeareSteps = 250;

// The validation loss `tiny` reaches after 250 steps (its own schedule: warmup 50, cosine
// 3e-3 -> 3e-4) on tinyshakespeare, measured with 2 threads over its 8 evaluation batches (8192
// tokens) of the validation split; each seed changes the initialisation, the training order and
// the validation samples:
//   seed 1234 (tiny's, the one tested) 1.987;  seeds 1..5: 2.033 2.007 2.002 2.029 1.993
//   (mean of all six 2.008, standard deviation 0.019, largest 2.033).
// For comparison: 5.56 (ln 259) at initialisation, 3.34 for the best context-free predictor.
// The run is deterministic, but any change of f32 summation order (a kernel rewrite, another
// thread count) sends training down another trajectory, as a new seed would: the previous
// kernels and micro-batching gave 1.977 for seed 1234 and 1.990 to 2.054 for seeds 1..5. The
// bound is therefore set just above the worst seed seen, 0.09 above the tested value: a change
// that makes training measurably worse (a wrong gradient, a broken schedule or sampler) fails it.
constexpr double kShakespeareValLossBound = 2.08;

TEST(TrainerLearning, ShakespeareValidationLossFalls) {
  const std::string corpus = testing::source_path("../shared/data/tinyshakespeare.txt");
  if (!fs::exists(corpus)) GTEST_SKIP() << "no " << corpus << " (the shared data folder next to the repository)";
  testing::TempDir dir;
  prepare_data(corpus, dir);
  const RunConfig run = tiny_config(dir, "run", {fmt::format("train.steps={}", kShakespeareSteps), "train.eval_every=0"});

  Trainer trainer(run, ProcessGrid::single());
  trainer.run();
  ASSERT_EQ(trainer.steps_done(), kShakespeareSteps);
  const double val = trainer.evaluate();

  const auto lines = read_jsonl(dir / "run/metrics.jsonl");
  ASSERT_FALSE(lines.empty());
  ASSERT_EQ(lines.front().at("step"), 1);
  ASSERT_EQ(lines.back().at("step"), kShakespeareSteps);
  // evaluate() reads fixed validation samples: the same number as the run's final evaluation.
  EXPECT_EQ(lines.back().at("val/loss").get<double>(), val);

  // A freshly initialised model (std 0.02) predicts nearly uniformly over the 259 tokens.
  const double first_ce = lines.front().at("train/ce").get<double>();
  EXPECT_NEAR(first_ce, std::log(259.0), 0.1);

  // The best context-free predictor scores the unigram entropy (3.34 nats here); a loss more
  // than a nat below it can only come from using the preceding tokens.
  const data::TokenDataset val_data(dir / "data/val", data::kVocabSize);
  const double entropy = unigram_entropy(val_data);
  std::printf("first-step ce %.4f (ln 259 = %.4f), validation loss %.4f after %lld steps, unigram entropy %.4f\n",
              first_ce, std::log(259.0), val, static_cast<long long>(kShakespeareSteps), entropy);
  EXPECT_GT(entropy, 3.0);
  EXPECT_LT(val, entropy - 1.0);
  EXPECT_LT(val, kShakespeareValLossBound);
}

// ---- reproducibility and accumulation ---------------------------------------------------------

class TrainerSynthetic : public ::testing::Test {
 protected:
  void SetUp() override {
    testing::write_file(dir_ / "corpus.txt", synthetic_corpus());
    prepare_data(dir_ / "corpus.txt", dir_);
  }

  // `tiny` at a quarter of its tokens per step (8 x 64), which is all these tests need, plus `extra`.
  RunConfig config(const std::string& run, std::vector<std::string> extra) const {
    extra.insert(extra.begin(), {"train.seq_len=64", "train.global_batch=8", "train.micro_batch=8"});
    return tiny_config(dir_, run, extra);
  }

  // Runs `steps` steps of `trainer`; returns the loss of each.
  static std::vector<double> losses(Trainer& trainer, int steps) {
    std::vector<double> out;
    for (int i = 0; i < steps; ++i) out.push_back(trainer.step().loss.loss);
    return out;
  }

  testing::TempDir dir_;
};

TEST_F(TrainerSynthetic, RunsAreBitwiseReproducible) {
  const std::vector<std::string> cfg = {"train.steps=5", "optim.warmup_steps=1"};
  Trainer a(config("a", cfg), ProcessGrid::single());
  Trainer b(config("b", cfg), ProcessGrid::single());
  const std::vector<double> la = losses(a, 5), lb = losses(b, 5);
  EXPECT_EQ(la, lb);
  EXPECT_EQ(a.data_position(), 5u * 8u);
  EXPECT_EQ(a.data_position(), b.data_position());

  const auto& pa = a.model().registry().params();
  const auto& pb = b.model().registry().params();
  ASSERT_EQ(pa.size(), pb.size());
  for (size_t i = 0; i < pa.size(); ++i) {
    ASSERT_EQ(pa[i].value.nbytes(), pb[i].value.nbytes()) << pa[i].spec.name;
    EXPECT_EQ(std::memcmp(pa[i].value.raw_data(), pb[i].value.raw_data(), pa[i].value.nbytes()), 0)
        << pa[i].spec.name << " differs between two identical runs";
  }

  std::vector<std::string> reseeded = cfg;
  reseeded.push_back("train.seed=99");
  Trainer c(config("c", reseeded), ProcessGrid::single());
  const std::vector<double> lc = losses(c, 5);
  for (int i = 0; i < 5; ++i) EXPECT_NE(lc[i], la[i]) << "step " << i + 1 << " did not depend on the seed";
}

// The largest normwise relative difference between the same-named tensors of two models, with
// the parameter it occurs in; `field` picks the value or the gradient.
std::pair<double, std::string> largest_difference(MoeTransformer& a, MoeTransformer& b, Tensor Param::*field) {
  const auto& pa = a.registry().params();
  const auto& pb = b.registry().params();
  EXPECT_EQ(pa.size(), pb.size());
  std::pair<double, std::string> worst{0.0, ""};
  for (size_t i = 0; i < pa.size() && i < pb.size(); ++i) {
    const double err = testing::rel_error(testing::to_double(pb[i].*field), testing::to_double(pa[i].*field));
    if (err > worst.first) worst = {err, pa[i].spec.name};
  }
  return worst;
}

// 4 micro-batches of 2 sequences must train like one batch of 8 up to f32 summation order. The
// load-balancing loss is a product of per-batch means (fraction routed x mean router
// probability), so its value genuinely depends on how the batch is split, as in every MoE
// trainer; it is switched off here to test the accumulation, not that property of the loss.
TEST_F(TrainerSynthetic, GradientAccumulationEqualsOneBatch) {
  const std::vector<std::string> common = {"train.steps=3", "optim.warmup_steps=1", "model.aux_loss_coef=0"};
  std::vector<std::string> one = common, four = common;
  one.push_back("train.micro_batch=8");
  four.push_back("train.micro_batch=2");
  Trainer a(config("one", one), ProcessGrid::single());
  Trainer b(config("four", four), ProcessGrid::single());

  for (int step = 1; step <= 3; ++step) {
    SCOPED_TRACE(fmt::format("step {}", step));
    const StepMetrics ma = a.step(), mb = b.step();
    EXPECT_NEAR(mb.loss.loss, ma.loss.loss, 1e-5 * ma.loss.loss);
    EXPECT_NEAR(mb.loss.ce, ma.loss.ce, 1e-5 * ma.loss.ce);
    EXPECT_NEAR(mb.loss.z, ma.loss.z, 1e-5 * ma.loss.z);
    EXPECT_NEAR(mb.grad_norm, ma.grad_norm, 1e-5 * ma.grad_norm);
    EXPECT_EQ(mb.loss.targets, ma.loss.targets);
    if (step == 1) {
      // The gradients left in the registry by the first step, from identical parameters: equal
      // to f32 rounding (measured: at most 4e-7 per tensor).
      const auto [err, name] = largest_difference(a.model(), b.model(), &Param::grad);
      std::printf("step 1: largest relative gradient difference %.3g (%s)\n", err, name.c_str());
      EXPECT_LT(err, 2e-6) << name;
    }
  }
  // Adam divides each gradient element by its own magnitude, so elements whose gradient is near
  // the f32 noise floor turn rounding differences into visible update differences: after 3
  // steps the parameters differ by up to 4e-5 per tensor (measured; layers.1.attn.wo), while
  // each step moves a weight of size ~0.02 by up to lr = 3e-3. (Adam also hides a wrong gradient
  // scale, which is why the gradients themselves are compared above.)
  const auto [err, name] = largest_difference(a.model(), b.model(), &Param::value);
  std::printf("after 3 steps: largest relative parameter difference %.3g (%s)\n", err, name.c_str());
  EXPECT_LT(err, 1e-4) << name;
}

// ---- metrics files ----------------------------------------------------------------------------

// The interpreter of the build tree's venv with the PyPI packages tensorboard and crc32c
// (scripts/test.sh creates <build>/pyenv; ctest sets MOEFORGE_PYTHON to it).
fs::path python_interpreter() {
  if (const char* env = std::getenv("MOEFORGE_PYTHON")) return env;
  return fs::read_symlink("/proc/self/exe").parent_path().parent_path() / "pyenv" / "bin" / "python";
}

TEST_F(TrainerSynthetic, MetricsFilesOfARun) {
  const RunConfig run = config("run", {"train.steps=10", "train.log_every=5", "train.eval_every=0",
                                       "optim.warmup_steps=2", "train.eval_batches=1"});
  Trainer trainer(run, ProcessGrid::single());
  trainer.run();

  // Step 1 is always logged (the loss at initialisation), then every log_every and the last.
  const auto lines = read_jsonl(dir_ / "run/metrics.jsonl");
  ASSERT_EQ(lines.size(), 3u);
  std::set<std::string> train_keys = {"train/loss", "train/ce",        "train/aux",          "train/z",
                                      "train/lr",   "train/grad_norm", "train/tokens_per_s", "train/elapsed_s"};
  for (int i = 0; i < trainer.model().config().n_layers; ++i)  // expert-load telemetry per MoE layer
    for (const char* name : {"tokens_min", "tokens_max", "tokens_cv", "dropped_fraction"})
      train_keys.insert("moe/layer" + std::to_string(i) + "/" + name);
  const int64_t logged_steps[] = {1, 5, 10};
  size_t n_scalars = 0;
  for (size_t i = 0; i < lines.size(); ++i) {
    const auto& line = lines[i];
    EXPECT_EQ(line.at("step").get<int64_t>(), logged_steps[i]);
    std::set<std::string> keys;
    for (const auto& [key, value] : line.items()) {
      if (key == "step" || key == "wall_time") continue;
      keys.insert(key);
      EXPECT_TRUE(value.is_number()) << key << " at line " << i + 1;
    }
    std::set<std::string> want = train_keys;
    if (i + 1 == lines.size()) want.insert("val/loss");
    EXPECT_EQ(keys, want) << "line " << i + 1;
    n_scalars += keys.size();
  }
  // The logged rate is the schedule's for that step (0-based in LrSchedule): tiny's cosine from
  // 3e-3 to 3e-4 after 2 warmup steps, so half the peak at step 1 and min_lr at the last.
  const LrSchedule schedule({.peak_lr = 3e-3f, .min_lr = 3e-4f, .warmup_steps = 2, .total_steps = 10,
                             .kind = LrScheduleKind::kCosine});
  for (size_t i = 0; i < lines.size(); ++i) {
    EXPECT_EQ(lines[i].at("train/lr").get<double>(), schedule.lr(logged_steps[i] - 1)) << "step " << logged_steps[i];
  }
  EXPECT_EQ(lines[0].at("train/lr").get<double>(), 1.5e-3f);
  EXPECT_EQ(lines[2].at("train/lr").get<double>(), 3e-4f);
  EXPECT_LT(lines[2].at("train/loss").get<double>(), lines[0].at("train/loss").get<double>());
  EXPECT_GT(lines[2].at("train/tokens_per_s").get<double>(), 0.0);

  const fs::path python = python_interpreter();
  if (!fs::exists(python)) {
    GTEST_SKIP() << "no Python interpreter at " << python.string()
                 << " (scripts/test.sh creates <build>/pyenv with the PyPI packages tensorboard and crc32c;"
                    " or set MOEFORGE_PYTHON)";
  }
  const std::string cmd = fmt::format("'{}' '{}' --logdir '{}' --jsonl '{}' --expect-scalars {} 2>&1", python.string(),
                                      testing::source_path("tests/launch/tb_readback.py"), dir_ / "run",
                                      dir_ / "run/metrics.jsonl", n_scalars);
  const testing::CommandResult r = testing::run_command(cmd);
  ASSERT_EQ(r.exit_code, 0) << cmd << "\n" << r.output;
  EXPECT_NE(r.output.find("tb_readback: OK"), std::string::npos) << r.output;
  std::printf("%s", r.output.c_str());
}

// ---- sampling ---------------------------------------------------------------------------------

TEST_F(TrainerSynthetic, SampleIsBoundedAndReproducible) {
  const std::vector<std::string> cfg = {"train.steps=30", "optim.warmup_steps=5", "train.sample_tokens=60"};
  Trainer a(config("a", cfg), ProcessGrid::single());
  for (int i = 0; i < 30; ++i) a.step();
  const std::string s1 = a.sample("The ");
  const std::string s2 = a.sample("The ");
  std::printf("sample after 30 steps: \"The %s\"\n", s1.c_str());
  EXPECT_FALSE(s1.empty());
  EXPECT_LE(s1.size(), 60u);
  EXPECT_EQ(s1, s2) << "sampling twice with the same seed";

  // After 30 steps the model puts negligible mass on bytes the corpus never contains: every
  // sampled byte is one of the corpus's.
  const std::string corpus = synthetic_corpus();
  const std::set<char> alphabet(corpus.begin(), corpus.end());
  for (char c : s1) EXPECT_TRUE(alphabet.count(c)) << "byte " << static_cast<int>(static_cast<unsigned char>(c));

  // The same config trained again samples the same text; another seed samples differently.
  Trainer b(config("b", cfg), ProcessGrid::single());
  for (int i = 0; i < 30; ++i) b.step();
  EXPECT_EQ(b.sample("The "), s1);
  std::vector<std::string> reseeded = cfg;
  reseeded.push_back("train.seed=7");
  Trainer c(config("c", reseeded), ProcessGrid::single());
  for (int i = 0; i < 30; ++i) c.step();
  EXPECT_NE(c.sample("The "), s1);
}

}  // namespace
}  // namespace moeforge
