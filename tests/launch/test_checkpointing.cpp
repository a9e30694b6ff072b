// Tests launch/checkpointing.cpp through the `moeforge` binary:
//  - preemption: SIGTERM to a training process ends it with exit 0 after the current step with a
//    checkpoint of that step; `--resume auto` continues and steps after it have bitwise the same
//    losses as an uninterrupted run (metrics.jsonl);
//  - a rank SIGKILLed in the middle of a save (the MOEFORGE_TEST_PAUSE_IN_SAVE pause point, two
//    ranks under mpirun) leaves `latest` on the previous checkpoint, which inspects clean and
//    resumes;
//  - `moeforge inspect` prints the manifest and tensor table, and exits 1 naming the damaged
//    dataset after a byte flip; `--resume` of a missing path is one clear error.
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <regex>

#include "tests/checkpoint/checkpoint_testing.h"
#include "tests/data/temp_dir.h"

namespace moeforge {
namespace {

namespace fs = std::filesystem;

std::string bin() {
  const char* b = std::getenv("MOEFORGE_BIN");
  return b ? b : "moeforge";
}

// `--set a --set b ...` for the tiny test run in `dir` plus extra overrides.
std::string sets(const std::string& dir, const std::vector<std::string>& extra) {
  std::string out;
  for (const std::string& o : testing::tiny_overrides(dir, extra)) out += " --set '" + o + "'";
  return out;
}

std::map<int64_t, double> losses(const std::string& jsonl) {
  std::map<int64_t, double> out;
  std::ifstream f(jsonl);
  for (std::string line; std::getline(f, line);) {
    const nlohmann::json j = nlohmann::json::parse(line);
    if (j.contains("train/loss")) out[j["step"].get<int64_t>()] = j["train/loss"].get<double>();
  }
  return out;
}

class Checkpointing : public ::testing::Test {
 protected:
  void SetUp() override { testing::prepare_corpus(dir_.str()); }
  testing::TempDir dir_;
};

TEST_F(Checkpointing, SigtermSavesExitsZeroAndResumesIdentically) {
  const std::string ckpt = dir_ / "ckpt";
  const std::vector<std::string> common = {"train.steps=40", "train.log_every=1", "logging.jsonl=true",
                                           "checkpoint.dir=" + ckpt};
  std::vector<std::string> straight = common, first = common, second = common;
  straight.push_back("logging.dir=" + dir_ / "straight");
  straight.push_back("checkpoint.dir=");
  first.push_back("logging.dir=" + dir_ / "first");
  second.push_back("logging.dir=" + dir_ / "second");
  const std::string cfg = " --config " + testing::source_path("configs/tiny.pbtxt");
  ASSERT_EQ(testing::run_command(bin() + " train" + cfg + sets(dir_.str(), straight) + " >/dev/null 2>&1").exit_code, 0);

  // SIGTERM once step 3 is printed; the run finishes its step, saves it and exits 0.
  const std::string log = dir_ / "first.log";
  const testing::CommandResult r = testing::run_command(
      "bash -c '" + bin() + " train" + cfg + sets(dir_.str(), first) + " >" + log +
      " 2>&1 & pid=$!; for i in $(seq 600); do grep -q \"^step  *3/\" " + log +
      " && break; sleep 0.05; done; kill -TERM $pid; wait $pid; echo exit=$?'");
  const std::string out = testing::read_file(log);
  EXPECT_NE(r.output.find("exit=0"), std::string::npos) << r.output << out;
  std::smatch m;
  ASSERT_TRUE(std::regex_search(out, m, std::regex("stopping after step (\\d+) on signal 15"))) << out;
  const int64_t stopped = std::stoll(m[1]);
  EXPECT_LT(stopped, 40) << out;
  EXPECT_NE(out.find(fmt::format("checkpoint: saved step {} to {}/step_{:08}", stopped, ckpt, stopped)),
            std::string::npos)
      << out;
  EXPECT_EQ(testing::read_file(ckpt + "/latest"), fmt::format("step_{:08}\n", stopped));

  const testing::CommandResult resumed =
      testing::run_command(bin() + " train" + cfg + sets(dir_.str(), second) + " --resume auto 2>&1");
  ASSERT_EQ(resumed.exit_code, 0) << resumed.output;
  EXPECT_NE(resumed.output.find(fmt::format("resumed from {}/step_{:08} at step {}", ckpt, stopped, stopped)),
            std::string::npos)
      << resumed.output;
  const std::map<int64_t, double> want = losses(dir_ / "straight/metrics.jsonl");
  const std::map<int64_t, double> got = losses(dir_ / "second/metrics.jsonl");
  ASSERT_EQ(got.size(), static_cast<size_t>(40 - stopped));
  for (const auto& [step, loss] : got) EXPECT_EQ(loss, want.at(step)) << "step " << step;
}

TEST_F(Checkpointing, RankKilledMidSaveLeavesPreviousCheckpoint) {
  const std::string ckpt = dir_ / "ckpt";
  const std::string args = " train --config " + testing::source_path("configs/tiny.pbtxt") +
                           sets(dir_.str(), {"checkpoint.dir=" + ckpt, "checkpoint.every=2", "train.steps=6"});
  const std::string log = dir_ / "killed.log";
  // Two ranks (dp 2): rank 0 writes the one shard file and pauses in the save of step 4; it is
  // SIGKILLed there and mpirun takes the job down.
  const std::string mpirun = "OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1 "
                             "MOEFORGE_TEST_PAUSE_IN_SAVE=4 timeout 120 mpirun -x MOEFORGE_TEST_PAUSE_IN_SAVE -np 2 "
                             "--oversubscribe " + bin();
  testing::run_command("bash -c '" + mpirun + args + " >" + log + " 2>&1 & job=$!; for i in $(seq 1200); do " +
                       "pid=$(sed -n \"s/.*test pause in save of step 4 (pid \\([0-9]*\\)).*/\\1/p\" " + log +
                       "); [ -n \"$pid\" ] && break; sleep 0.05; done; kill -KILL $pid; wait $job; true'");
  const std::string out = testing::read_file(log);
  ASSERT_NE(out.find("test pause in save of step 4"), std::string::npos) << out;
  EXPECT_EQ(testing::read_file(ckpt + "/latest"), "step_00000002\n") << out;
  EXPECT_TRUE(fs::exists(ckpt + "/.tmp_step_00000004/rank_00000.h5"));
  EXPECT_FALSE(fs::exists(ckpt + "/step_00000004"));

  const testing::CommandResult inspect = testing::run_command(bin() + " inspect " + ckpt + " 2>&1");
  EXPECT_EQ(inspect.exit_code, 0) << inspect.output;
  EXPECT_NE(inspect.output.find("step 2 | optimizer steps 2 | data position 16"), std::string::npos) << inspect.output;
  EXPECT_NE(inspect.output.find("embed.weight"), std::string::npos) << inspect.output;
  EXPECT_NE(inspect.output.find("verified 1 files"), std::string::npos) << inspect.output;

  const testing::CommandResult resumed = testing::run_command(bin() + args + " --resume auto 2>&1");
  EXPECT_EQ(resumed.exit_code, 0) << resumed.output;
  EXPECT_NE(resumed.output.find("at step 2"), std::string::npos) << resumed.output;
  EXPECT_EQ(testing::read_file(ckpt + "/latest"), "step_00000006\n");
  EXPECT_FALSE(fs::exists(ckpt + "/.tmp_step_00000004"));  // stale, removed by the next commit
}

TEST_F(Checkpointing, InspectNamesDamageAndResumeNamesMissingPath) {
  const std::string ckpt = dir_ / "ckpt";
  const std::string args = " train --config " + testing::source_path("configs/tiny.pbtxt") +
                           sets(dir_.str(), {"checkpoint.dir=" + ckpt, "train.steps=2"});
  ASSERT_EQ(testing::run_command(bin() + args + " >/dev/null 2>&1").exit_code, 0);
  const std::string shard = ckpt + "/step_00000002/rank_00000.h5";
  std::string bytes = testing::read_file(shard);
  bytes[bytes.size() / 2] = static_cast<char>(bytes[bytes.size() / 2] ^ 0x40);
  testing::write_file(shard, bytes);
  const testing::CommandResult r = testing::run_command(bin() + " inspect " + ckpt + " 2>&1");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find("rank_00000.h5: size"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("verification FAILED"), std::string::npos) << r.output;

  const testing::CommandResult missing = testing::run_command(bin() + args + " --resume " + dir_ / "nope" + " 2>&1");
  EXPECT_EQ(missing.exit_code, 1) << missing.output;
  EXPECT_NE(missing.output.find("moeforge: error: " + dir_ / "nope" + ": no such checkpoint"), std::string::npos)
      << missing.output;
}

}  // namespace
}  // namespace moeforge
