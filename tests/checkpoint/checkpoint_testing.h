// Shared by the checkpoint tests: a small synthetic corpus prepared into token shards, and a
// shrunken `tiny` configuration that trains a few steps in well under a second per step while
// still exercising every sharding rule (vocabulary padding under tp 2 and 4, kv heads split over
// tp 4, experts, gradient accumulation over micro-batches).
#pragma once

#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "data/prepare.h"
#include "launch/config.h"
#include "tests/testing.h"

namespace moeforge::testing {

// Writes a deterministic English-like text to <dir>/corpus.txt and prepares <dir>/data/{train,val}.
inline void prepare_corpus(const std::string& dir) {
  const std::vector<std::string> words = {"the", "king", "queen", "speaks", "to", "a", "fool", "and", "her",
                                          "his", "crown", "is", "gold", "night", "falls", "upon", "castle"};
  std::mt19937 gen(7);
  std::string text;
  while (text.size() < 30000) {
    const int n = 3 + static_cast<int>(gen() % 7);
    for (int i = 0; i < n; ++i) text += (i ? " " : "") + words[gen() % words.size()];
    text += ".\n";
  }
  std::filesystem::create_directories(dir);
  std::ofstream(dir + "/corpus.txt") << text;
  data::prepare({.inputs = {dir + "/corpus.txt"}, .output_dir = dir + "/data", .val_fraction = 0.1});
}

// configs/tiny.pbtxt shrunk, on the data of `dir`, plus `extra` overrides (applied last).
inline std::vector<std::string> tiny_overrides(const std::string& dir, const std::vector<std::string>& extra = {}) {
  std::vector<std::string> o = {
      "data.train=" + dir + "/data/train", "data.val=" + dir + "/data/val", "logging.dir=" + dir + "/run",
      "logging.tensorboard=false",         "logging.jsonl=false",           "train.steps=10",
      "train.seq_len=32",                  "train.global_batch=8",          "train.micro_batch=2",
      "train.eval_every=0",                "train.eval_batches=1",          "train.sample_tokens=0",
      "train.log_every=100",               "optim.warmup_steps=2",          "model.dim=64",
      "model.n_layers=2",                  "model.n_heads=4",               "model.n_kv_heads=4",
      "model.head_dim=16",                 "model.n_experts=4",             "model.expert_hidden=64"};
  o.insert(o.end(), extra.begin(), extra.end());
  return o;
}

inline config::RunConfig tiny_run(const std::string& dir, const std::vector<std::string>& extra = {},
                                  int world_size = 1) {
  return load_run_config(source_path("configs/tiny.pbtxt"), tiny_overrides(dir, extra), world_size);
}

}  // namespace moeforge::testing
