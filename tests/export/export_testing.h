// Shared by the export tests: one small trained checkpoint (the `moeforge` binary trains the
// shrunken tiny config of tests/checkpoint/checkpoint_testing.h with GQA for 4 steps), the
// binary and the Python interpreter that runs the independent readers.
#pragma once

#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "tests/checkpoint/checkpoint_testing.h"

namespace moeforge::testing {

// The binary under test: MOEFORGE_BIN, else <build>/launch/moeforge next to <build>/tests/.
inline std::string moeforge_bin() {
  if (const char* env = std::getenv("MOEFORGE_BIN")) return env;
  return (std::filesystem::read_symlink("/proc/self/exe").parent_path().parent_path() / "launch" /
          "moeforge").string();
}

// The build tree's venv (scripts/test.sh installs safetensors, gguf, tokenizers there).
inline std::string python_interpreter() {
  if (const char* env = std::getenv("MOEFORGE_PYTHON")) return env;
  return (std::filesystem::read_symlink("/proc/self/exe").parent_path().parent_path() / "pyenv" /
          "bin" / "python").string();
}

// Model overrides every export test trains and reloads with (GQA: 4 query heads, 2 kv heads).
inline std::vector<std::string> export_model_overrides() {
  return {"model.n_kv_heads=2", "model.max_seq_len=128", "optim.warmup_steps=1", "train.steps=4"};
}

inline std::string overrides_flags(const std::vector<std::string>& o) {
  std::string s;
  for (const std::string& x : o) s += " --set '" + x + "'";
  return s;
}

// Prepares data in `dir` and trains into <dir>/ckpt (more overrides: `extra`); returns the step
// directory.
inline std::string train_checkpoint(const std::string& dir, const std::vector<std::string>& extra = {}) {
  prepare_corpus(dir);
  std::vector<std::string> o = tiny_overrides(dir, export_model_overrides());
  o.insert(o.end(), extra.begin(), extra.end());
  o.push_back("checkpoint.dir=" + dir + "/ckpt");
  o.push_back("logging.jsonl=true");
  o.push_back("train.log_every=1");
  const std::string cmd = fmt::format("'{}' train --config '{}'{} 2>&1", moeforge_bin(),
                                      source_path("configs/tiny.pbtxt"), overrides_flags(o));
  const CommandResult r = run_command(cmd);
  EXPECT_EQ(r.exit_code, 0) << cmd << "\n" << r.output;
  return dir + "/ckpt/step_00000004";
}

}  // namespace moeforge::testing
