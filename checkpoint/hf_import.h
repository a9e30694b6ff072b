// Import of open weights: a Hugging Face Mixtral-layout folder (config.json plus one
// model.safetensors, or shards listed by model.safetensors.index.json; F32, F16 or BF16) becomes
// a moeforge checkpoint at step 0 that any layout resumes (`moeforge train --resume OUT`), so
// training continues from the imported weights with fresh AdamW state.
//
// Every safetensors file is validated in full before use (checkpoint/safetensors.h); the index's
// weight_map must name exactly the tensors its shards hold; every tensor the config implies must
// be present with its exact shape and nothing else may be (non-persistent rotary buffers aside).
// A config Mixtral's math allows but moeforge does not implement (sliding window, RoPE scaling,
// another activation) is refused naming the key.
//
// Output: <out>/step_00000000/ with manifest.pb and rank_00000.h5 (each parameter one dataset,
// plus zero AdamW moments), written under a temporary name, fsynced and renamed, then
// <out>/latest. Memory: one moeforge parameter (a layer's expert stack) at a time.
#pragma once

#include <string>

#include "checkpoint/mixtral_layout.h"
#include "configs/moeforge.pb.h"

namespace moeforge::checkpoint {

struct ImportResult {
  std::string step_dir;
  HfModel model;
  int64_t tensors = 0;  // HF tensors read
  int64_t parameters = 0;  // elements
};

// base: the run configuration recorded in the checkpoint; its model section is replaced by the
// imported model's.
ImportResult import_hf(const std::string& hf_dir, const std::string& out_dir, config::RunConfig base);

}  // namespace moeforge::checkpoint
