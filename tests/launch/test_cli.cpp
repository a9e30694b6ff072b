// Tests launch/main.cpp through the `moeforge` binary itself (MOEFORGE_BIN, set by ctest): help
// and version, the exit codes of the contract (0 success, 1 runtime error, 2 usage or config
// error) with their one-line messages, `data prepare`, and a complete three-step training run
// whose console lines have the documented format.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "tests/data/temp_dir.h"
#include "tests/testing.h"

namespace moeforge {
namespace {

namespace fs = std::filesystem;

// The binary under test: MOEFORGE_BIN, else <build>/launch/moeforge next to <build>/tests/.
std::string moeforge_bin() {
  if (const char* env = std::getenv("MOEFORGE_BIN")) return env;
  return (fs::read_symlink("/proc/self/exe").parent_path().parent_path() / "launch" / "moeforge").string();
}

struct Result {
  int code = -1;  // exit status, or -1 when the process did not exit normally
  std::string out, err;
};

// Runs `moeforge <args>` (args already shell-quoted where needed) with stdout and stderr captured
// separately through files in `dir`.
Result moeforge(const std::string& args, const testing::TempDir& dir) {
  const std::string out = dir / "stdout.txt", err = dir / "stderr.txt";
  const std::string cmd = fmt::format("'{}' {} >'{}' 2>'{}'", moeforge_bin(), args, out, err);
  const int status = std::system(cmd.c_str());
  Result r;
  if (status != -1 && WIFEXITED(status)) r.code = WEXITSTATUS(status);
  r.out = testing::read_file(out);
  r.err = testing::read_file(err);
  return r;
}

std::string quoted(const std::string& s) { return "'" + s + "'"; }

class Cli : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(fs::exists(moeforge_bin())) << "no moeforge binary at " << moeforge_bin() << " (set MOEFORGE_BIN)";
  }

  Result run(const std::string& args) const { return moeforge(args, dir_); }

  // `tiny` with its data in dir_/data and its logs in dir_/run, plus `extra` (" --set a=b ...").
  std::string train_args(const std::string& config, const std::string& extra = "") const {
    return fmt::format("train --config {} --set data.train={} --set data.val={} --set logging.dir={}{}", quoted(config),
                       quoted(dir_ / "data/train"), quoted(dir_ / "data/val"), quoted(dir_ / "run"), extra);
  }

  // A small text prepared into dir_/data; returns `data prepare`'s result.
  Result prepare_corpus() const {
    std::string text;
    for (int i = 0; i < 400; ++i) text += fmt::format("Line {} of a small corpus: the quick brown fox.\n", i);
    testing::write_file(dir_ / "corpus.txt", text);
    return run(fmt::format("data prepare --input {} --output {} --val-fraction 0.1", quoted(dir_ / "corpus.txt"),
                           quoted(dir_ / "data")));
  }

  testing::TempDir dir_;
};

// ---- help and version -------------------------------------------------------------------------

TEST_F(Cli, HelpNamesEveryOption) {
  const Result top = run("--help");
  EXPECT_EQ(top.code, 0) << top.err;
  for (const char* word : {"train", "data", "--version", "--help"}) EXPECT_NE(top.out.find(word), std::string::npos) << word;

  const Result train = run("train --help");
  EXPECT_EQ(train.code, 0) << train.err;
  for (const char* word : {"--config", "--set"}) EXPECT_NE(train.out.find(word), std::string::npos) << word;

  const Result prepare = run("data prepare --help");
  EXPECT_EQ(prepare.code, 0) << prepare.err;
  for (const char* word : {"--input", "--output", "--val-fraction", "--max-tokens-per-shard"}) {
    EXPECT_NE(prepare.out.find(word), std::string::npos) << word;
  }
}

TEST_F(Cli, Version) {
  const Result r = run("--version");
  EXPECT_EQ(r.code, 0);
  EXPECT_EQ(r.out, "moeforge 0.1.0\n");
}

// ---- usage errors: exit 2 ---------------------------------------------------------------------

TEST_F(Cli, UsageErrorsExitTwo) {
  for (const char* args : {"", "frobnicate", "--frobnicate", "train", "data", "data frobnicate",
                           "train --config configs/tiny.pbtxt --frobnicate", "data prepare --output x"}) {
    SCOPED_TRACE(std::string("moeforge ") + args);
    const Result r = run(args);
    EXPECT_EQ(r.code, 2);
    EXPECT_TRUE(r.out.empty()) << r.out;
    EXPECT_FALSE(r.err.empty());
  }
  EXPECT_NE(run("").err.find("A subcommand is required"), std::string::npos);
  EXPECT_NE(run("train").err.find("--config is required"), std::string::npos);
  const std::string unknown_flag =
      run("train --config " + quoted(testing::source_path("configs/tiny.pbtxt")) + " --frobnicate").err;
  EXPECT_NE(unknown_flag.find("--frobnicate"), std::string::npos) << unknown_flag;
}

// An unknown word where a subcommand belongs is named, with the choices (CLI11 alone would say
// "A subcommand is required", which sends the user looking elsewhere).
TEST_F(Cli, UnknownSubcommandIsNamed) {
  const std::string more = "\nRun with --help for more information.\n";
  EXPECT_EQ(run("frobnicate").err, "moeforge: unknown subcommand 'frobnicate'; expected one of: train, data, inspect, export, import, generate, eval, plan" + more);
  EXPECT_EQ(run("--frobnicate").err, "moeforge: unknown option '--frobnicate'; expected one of: train, data, inspect, export, import, generate, eval, plan" + more);
  EXPECT_EQ(run("data frobnicate").err,
            "moeforge data: unknown subcommand 'frobnicate'; expected one of: prepare" + more);
}

// ---- configuration errors: exit 2, one line -------------------------------------------------

TEST_F(Cli, ConfigErrorsAreOneLine) {
  const std::string syntax = dir_ / "syntax.pbtxt", cross = dir_ / "cross.pbtxt";
  testing::write_file(syntax, "model {\n  topk: 2\n}\n");
  testing::write_file(cross, "model {\n  n_heads: 12\n  n_kv_heads: 5\n}\ndata { train: \"d\" }\n");
  const std::string tiny = testing::source_path("configs/tiny.pbtxt");

  struct Case {
    std::string args, message;
  };
  const std::vector<Case> cases = {
      {"train --config " + quoted(syntax),
       syntax + ":2:3: Message type \"moeforge.config.ModelConfig\" has no field named \"topk\"."},
      {"train --config " + quoted(cross), cross + ":2: model.n_heads: 12 is not divisible by model.n_kv_heads = 5"},
      {"train --config " + quoted(tiny) + " --set train.seq_len=512",
       "--set train.seq_len=512: train.seq_len: must be in [1, model.max_seq_len = 256], got 512"},
      {"train --config " + quoted(tiny) + " --set train.frob=1",
       "--set train.frob=1: unknown field \"frob\" in moeforge.config.TrainConfig"},
      {"train --config " + quoted(dir_ / "missing.pbtxt"),
       dir_ / "missing.pbtxt" + ": cannot read config file (No such file or directory)"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.args);
    const Result r = run(c.args);
    EXPECT_EQ(r.code, 2);
    EXPECT_EQ(r.err, "moeforge: config error: " + c.message + "\n");
    EXPECT_TRUE(r.out.empty()) << r.out;
  }
}

// ---- runtime errors: exit 1 -------------------------------------------------------------------

TEST_F(Cli, MissingDataDirectory) {
  const Result r = run(train_args(testing::source_path("configs/tiny.pbtxt")));
  EXPECT_EQ(r.code, 1);
  EXPECT_EQ(r.err, "moeforge: error: " + dir_ / "data/train" + ": no such directory; run `moeforge data prepare`\n");
}

TEST_F(Cli, PrepareMissingInput) {
  const Result r = run("data prepare --input " + quoted(dir_ / "absent.txt") + " --output " + quoted(dir_ / "data"));
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.err.find(dir_ / "absent.txt"), std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(dir_ / "data/manifest.json"));
}

TEST_F(Cli, TruncatedShardStopsTraining) {
  const Result prepared = prepare_corpus();
  ASSERT_EQ(prepared.code, 0) << prepared.err;
  const std::string shard = dir_ / "data/train/shard_00000.bin";
  ASSERT_TRUE(fs::exists(shard));
  fs::resize_file(shard, fs::file_size(shard) - 7);

  const Result r = run(train_args(testing::source_path("configs/tiny.pbtxt"), " --set train.steps=3 --set optim.warmup_steps=1"));
  EXPECT_EQ(r.code, 1);
  EXPECT_TRUE(r.err.starts_with("moeforge: error: ")) << r.err;
  EXPECT_NE(r.err.find(shard), std::string::npos) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
}

// ---- a complete run ---------------------------------------------------------------------------

TEST_F(Cli, PrepareAndTrain) {
  const Result prepared = prepare_corpus();
  ASSERT_EQ(prepared.code, 0) << prepared.err;
  const std::string corpus = testing::read_file(dir_ / "corpus.txt");
  EXPECT_TRUE(std::regex_match(
      prepared.out,
      std::regex(fmt::format(R"(prepared 1 file\(s\), {} bytes: train \d+ tokens in 1 shard\(s\), validation \d+ tokens )"
                             R"(in 1 shard\(s\); manifest .*manifest\.json\n)",
                             corpus.size()))))
      << prepared.out;
  EXPECT_TRUE(fs::exists(dir_ / "data/manifest.json"));

  const Result r = run(train_args(testing::source_path("configs/tiny.pbtxt"),
                                  " --set train.steps=3 --set optim.warmup_steps=1 --set train.log_every=1"
                                  " --set train.eval_batches=1 --set train.sample_tokens=16"));
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_TRUE(r.err.empty()) << r.err;

  const std::string num = R"([0-9]+\.[0-9]+)", sci = R"([0-9]\.[0-9]{2}e[-+][0-9]{2})", dur = R"([0-9]{2}:[0-9]{2})";
  const std::regex step_line(fmt::format(R"(step 3/3 \| loss {0} \(ce {0} aux {0} z {0}\) \| lr {1} \| gnorm {0} \| )"
                                         R"([0-9.]+[kM]? tok/s \| {2} \| ETA 00:00)",
                                         num, sci, dur));
  const std::regex val_line(fmt::format(R"(step 3 \| validation loss {0} nats/token \({0} bits/byte\))", num));
  bool has_step = false, has_val = false, has_sample = false;
  int step_lines = 0;
  std::istringstream lines(r.out);
  for (std::string line; std::getline(lines, line);) {
    if (line.starts_with("step ") && line.find("ETA") != std::string::npos) ++step_lines;
    has_step |= std::regex_match(line, step_line);
    has_val |= std::regex_match(line, val_line);
    has_sample |= line == "sample (prompt \"The \", temperature 0.8):";
  }
  EXPECT_EQ(step_lines, 3) << r.out;
  EXPECT_TRUE(has_step) << r.out;
  EXPECT_TRUE(has_val) << r.out;
  EXPECT_TRUE(has_sample) << r.out;
  EXPECT_TRUE(fs::exists(dir_ / "run/metrics.jsonl"));
}

}  // namespace
}  // namespace moeforge
