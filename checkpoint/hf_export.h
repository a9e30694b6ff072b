// Export of a checkpoint as open weights (DESIGN.md, Checkpoints: export):
//
//  - export_hf: a Hugging Face folder for MixtralForCausalLM — config.json, generation_config.json,
//    the weights as safetensors (one model.safetensors, or model-0000i-of-0000n.safetensors shards
//    of at most max_shard_bytes each plus model.safetensors.index.json), the byte-level tokenizer
//    (tokenizer.json, tokenizer_config.json, special_tokens_map.json), the model card README.md,
//    and SHA256SUMS (sha256sum format) over every other file.
//  - export_gguf: one GGUF v3 file, architecture llama with the MoE keys, the byte-level
//    tokenizer as a gpt2 vocabulary without merges, q/k rows permuted for llama.cpp's RoPE, the
//    experts as 3-D tensors; norms and routers in f32, every other weight in the chosen type
//    (one whose rows do not split into quantization blocks falls back to f16).
//
// Both stream: one tensor (one expert's matrix for HF) is in memory at a time, read from the
// checkpoint in whatever layout wrote it (checkpoint/tensor_reader.h). A model Mixtral cannot
// express is refused before anything is written (checkpoint/mixtral_layout.h). The HF folder is
// staged in `<out>.partial` and moved in when complete; the GGUF file appears under its name only
// when complete. An existing output folder is reused only if it holds a previous export (its
// SHA256SUMS lists what to replace); anything else there is refused.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "checkpoint/gguf.h"
#include "checkpoint/model_card.h"

namespace moeforge::checkpoint {

struct HfExportOptions {
  std::string out_dir;
  std::string dtype = "bf16";  // bf16, f16 or f32
  int64_t max_shard_bytes = 5'000'000'000;
};

// Returns the files written (names relative to out_dir).
std::vector<std::string> export_hf(const std::string& step_dir, const ReleaseInfo& info, const HfExportOptions& o);

struct GgufExportOptions {
  std::string out_path;
  GgmlType type = GgmlType::kF16;
};

// Returns the names of the tensors that fell back to f16 (empty when none did).
std::vector<std::string> export_gguf(const std::string& step_dir, const ReleaseInfo& info, const GgufExportOptions& o);

// "5GB", "500MB", "2GiB", "1000" (bytes) -> bytes; throws naming the text otherwise.
int64_t parse_size(const std::string& text);

}  // namespace moeforge::checkpoint
