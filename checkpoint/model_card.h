// What an open-weight release says about itself: the facts the export writes into the model card
// (README.md of the HF folder) and into GGUF's general.* keys. The five openness facts: weights
// (formats, dtypes), architecture and code (config, moeforge version, source revision), training
// data (the data manifest: sources, token counts, shard hashes), license (SPDX id, OSI-approved
// or not), provenance (steps, tokens, parallel layout, final losses).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "models/model_config.h"

namespace moeforge::checkpoint {

struct ReleaseInfo {
  ModelConfig model;
  int64_t max_seq_len = 0;         // trained context (GGUF context_length, HF max_position_embeddings)
  std::string name = "moeforge-model";
  std::string license;             // SPDX id; empty: not stated
  std::string moeforge_version;
  std::string source_revision;     // git commit of the moeforge source, or "unknown"
  std::string run_config;          // the run's config, protobuf text
  std::string checkpoint;          // the step directory exported
  int64_t steps = 0;
  int64_t tokens = 0;              // training tokens seen
  std::string layout;              // "4 ranks: tp 1 x pp 1 x dp 4, ep 1"
  std::string data_manifest;       // the training data's manifest.json text; empty if not found
  std::string final_metrics;       // the last logged metrics (JSON line); empty if not found
};

// True for the SPDX ids of OSI-approved licenses moeforge knows (Apache-2.0, MIT, BSD-*, GPL, ...).
bool osi_approved(const std::string& spdx);
// Throws unless `spdx` looks like an SPDX license id or expression (letters, digits, . - + and
// spaces, parentheses, no newline).
void check_spdx(const std::string& spdx);

// The model card. weight_files: "model-00001-of-00002.safetensors (bf16)" lines.
std::string model_card(const ReleaseInfo& info, const std::string& dtype, const std::vector<std::string>& weight_files);

}  // namespace moeforge::checkpoint
