// Text generation from a model: autoregressive sampling of next tokens.
//
// Each new token re-runs the model over the whole context (truncated to the last `context`
// tokens); there is no KV cache yet, which is fine for the short samples the trainer prints and
// for small models. Sampling is reproducible: token i draws its uniform number from Philox
// (seed, "generate", i).
#pragma once

#include <cstdint>
#include <vector>

#include "models/transformer.h"

namespace moeforge {

struct SampleOptions {
  int64_t max_new_tokens = 200;
  float temperature = 0.8f;  // 0 = greedy (argmax)
  uint64_t seed = 0;
  int64_t context = 256;     // longest context fed to the model
  int32_t stop_token = -1;   // generation ends after this token (e.g. EOS); -1: never
};

// Returns only the generated tokens (not the prompt). The prompt must be non-empty.
std::vector<int32_t> generate(MoeTransformer& model, const std::vector<int32_t>& prompt, const SampleOptions& options);

}  // namespace moeforge
