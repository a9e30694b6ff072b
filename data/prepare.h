// `moeforge data prepare`: text files -> byte-tokenized shards plus a manifest.
//
// Each input file becomes one training document and, when val_fraction F > 0, one validation
// document: the last F of its bytes, with the cut moved forward to the next line start so no
// line is split between the two. Every document is stored as BOS + bytes + EOS. Output:
//
//   OUT/train/shard_00000.bin ...   training stream (token_shard.h format)
//   OUT/val/shard_00000.bin ...     validation stream (only when F > 0)
//   OUT/manifest.json               tokenizer, every source file (path, bytes, sha256, tokens
//                                   per split) and every shard (file, tokens, documents, sha256)
//
// Inputs are streamed in chunks, so their size is not bounded by memory; one shard's tokens
// (max_tokens_per_shard int32s) are buffered. A document longer than the space left in a shard
// continues in the next one; each shard's document index records the part it holds. Every
// input is checked before anything is written; stale shard_*.bin files of an earlier run in
// OUT/train and OUT/val are removed so the output directory reads as exactly this dataset, and
// the manifest is written last (via rename), so its presence marks a complete run.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace moeforge::data {

struct PrepareOptions {
  std::vector<std::string> inputs;  // text files, in the order their documents are stored
  std::string output_dir;
  double val_fraction = 0.0;  // in [0, 1)
  int64_t max_tokens_per_shard = int64_t{1} << 26;
};

struct SplitSummary {
  int64_t tokens = 0;
  int64_t documents = 0;
  int64_t shards = 0;
};

struct PrepareSummary {
  int64_t input_files = 0;
  int64_t input_bytes = 0;
  SplitSummary train;
  SplitSummary val;
  std::string manifest_path;
};

PrepareSummary prepare(const PrepareOptions& options);

}  // namespace moeforge::data
