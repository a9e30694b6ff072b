// Tests launch/main.cpp under mpirun: bad parallel layouts end with one message from rank 0 and
// every rank exiting (code 2, no hang), and a multi-rank run trains and agrees with one process.
#include <gtest/gtest.h>

#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <regex>
#include <string>

#include "data/prepare.h"
#include "tests/testing.h"

namespace moeforge {
namespace {

namespace fs = std::filesystem;

// Runs `mpirun -np N moeforge ARGS` (bounded by `timeout` so a hang fails instead of blocking).
testing::CommandResult mpirun(int ranks, const std::string& args) {
  const char* bin = std::getenv("MOEFORGE_BIN");
  const std::string cmd = "OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1 timeout 120 mpirun -np " +
                          std::to_string(ranks) + " --oversubscribe " + (bin ? bin : "moeforge") + " " + args +
                          " 2>&1";
  return testing::run_command(cmd);
}

int count(const std::string& text, const std::string& needle) {
  int n = 0;
  for (size_t pos = text.find(needle); pos != std::string::npos; pos = text.find(needle, pos + 1)) ++n;
  return n;
}

const std::string kConfig = testing::source_path("configs/tiny.pbtxt");

TEST(LaunchMpi, WorldSizeNotDivisibleByLayoutIsOneMessageFromRankZero) {
  const testing::CommandResult r = mpirun(3, "train --config " + kConfig + " --set parallel.tp=2 --set data.train=/nonexistent");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_EQ(count(r.output, "moeforge: config error:"), 1) << r.output;
  EXPECT_NE(r.output.find("--set parallel.tp=2: parallel.tp: parallel.tp * parallel.pp = 2 * 1 = 2 does not divide the world size 3"), std::string::npos) << r.output;
}

TEST(LaunchMpi, HeadsNotDivisibleByTpIsOneMessageFromRankZero) {
  const testing::CommandResult r = mpirun(3, "train --config " + kConfig + " --set parallel.tp=3 --set data.train=/nonexistent");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_EQ(count(r.output, "moeforge: config error:"), 1) << r.output;
  EXPECT_NE(r.output.find("parallel.tp: 3 does not divide model.n_heads = 4"), std::string::npos) << r.output;
}

TEST(LaunchMpi, MissingDataAbortsEveryRank) {
  const testing::CommandResult r = mpirun(2, "train --config " + kConfig + " --set data.train=/nonexistent/train --set data.val=");
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("/nonexistent/train"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("moeforge: rank "), std::string::npos) << r.output;
}

TEST(LaunchMpi, TwoRanksTrainLikeOneProcess) {
  const std::string corpus = testing::source_path("../shared/data/tinyshakespeare.txt");
  if (!fs::exists(corpus)) GTEST_SKIP() << "no corpus at " << corpus;
  const fs::path dir = fs::temp_directory_path() / ("moeforge_launch_mpi_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  data::prepare({.inputs = {corpus}, .output_dir = dir.string(), .val_fraction = 0.1});
  const std::string common = "train --config " + kConfig + " --set data.train=" + (dir / "train").string() +
                             " --set data.val=" + (dir / "val").string() +
                             " --set train.steps=3 --set optim.warmup_steps=1 --set train.log_every=1"
                             " --set train.seq_len=64 --set train.sample_tokens=16 --set train.eval_batches=2";
  const testing::CommandResult one = mpirun(1, common + " --set logging.dir=" + (dir / "one").string());
  const testing::CommandResult two = mpirun(2, common + " --set parallel.tp=2 --set logging.dir=" + (dir / "two").string());
  ASSERT_EQ(one.exit_code, 0) << one.output;
  ASSERT_EQ(two.exit_code, 0) << two.output;
  // Rank 0 alone prints: one line per step, one validation line, one sample.
  EXPECT_EQ(count(two.output, "step 3/3 |"), 1) << two.output;
  EXPECT_EQ(count(two.output, "validation loss"), 1) << two.output;
  // The printed losses (4 decimals) of every step agree with the single process.
  const std::regex loss_re(R"(step (\d)/3 \| loss ([0-9.]+) \(ce ([0-9.]+))");
  std::vector<std::string> a, b;
  for (std::sregex_iterator it(one.output.begin(), one.output.end(), loss_re), end; it != end; ++it) a.push_back((*it)[0]);
  for (std::sregex_iterator it(two.output.begin(), two.output.end(), loss_re), end; it != end; ++it) b.push_back((*it)[0]);
  ASSERT_EQ(a.size(), 3u) << one.output;
  EXPECT_EQ(a, b) << two.output;
  fs::remove_all(dir);
}

}  // namespace
}  // namespace moeforge
