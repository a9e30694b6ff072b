// The open-weight commands of the `moeforge` CLI: export, import, generate. Each returns the
// process exit code (0) or throws moeforge::Error (main reports it and exits 1).
//
//   moeforge export CKPT --format hf --out DIR [--dtype bf16|f16|f32] [--max-shard-size 5GB] [--license ID]
//   moeforge export CKPT --format gguf --out FILE.gguf [--type f32|f16|bf16|q8_0|q4_0] [--license ID]
//   moeforge import HF_DIR --out CKPT_DIR
//   moeforge generate CKPT --prompt TEXT [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P] [--seed S]
//
// export and import run in one process (they stream tensors; no layout is involved). generate
// loads the checkpoint, whatever layout wrote it, into a single-rank model and decodes with the
// KV cache; started under mpirun, rank 0 does that and the other ranks wait for it.
#pragma once

#include <cstdint>
#include <string>

#include "launch/generate.h"

namespace moeforge {

struct ExportCommand {
  std::string checkpoint;
  std::string format;  // "hf" or "gguf"
  std::string out;
  std::string dtype = "bf16";           // hf
  std::string max_shard_size = "5GB";   // hf
  std::string type = "f16";             // gguf
  std::string license;
  std::string name;  // model name for the card / general.name; empty: the checkpoint root's name
};
int run_export(const ExportCommand& c);

int run_import(const std::string& hf_dir, const std::string& out);

struct GenerateCommand {
  std::string checkpoint;
  std::string prompt;
  SampleOptions sample{.max_new_tokens = 200, .temperature = 0.8f, .seed = 0, .context = 0};  // context 0: max_seq_len
  bool bos = true;  // start from <bos>, as training documents do
};
int run_generate(const GenerateCommand& c);

// "git describe"-style revision of the source this binary was built from, or "unknown".
const char* source_revision();

}  // namespace moeforge
