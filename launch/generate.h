// Text generation from a model: autoregressive sampling of next tokens.
//
// Two paths share one sampler:
//  - generate(InferenceModel&, ...): the KV-cache decode path (models/inference.h) of `moeforge
//    generate`: the prompt is run once, then each new token costs one position. When the cache
//    is full, it restarts from the last half of the context (prompt included) and continues.
//  - generate(logits, ...): re-runs a whole-sequence logits function (the trainer's pipeline
//    forward on any training layout) over the whole context, truncated to the last `context`
//    tokens, for every token; the trainer's samples.
//
// Sampling: logits / temperature -> softmax -> keep the top_k most likely tokens (0: all) -> keep
// the smallest set of most likely tokens whose probability reaches top_p (1: all) -> renormalise
// -> inverse-CDF draw. Temperature 0 is greedy (argmax). Reproducible: token i draws its uniform
// number from Philox (seed, "generate", i), so both paths give the same tokens for the same
// logits.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "models/inference.h"

namespace moeforge {

struct SampleOptions {
  int64_t max_new_tokens = 200;
  float temperature = 0.8f;  // 0 = greedy (argmax)
  uint64_t seed = 0;
  int64_t context = 256;     // longest context fed to the model
  int32_t stop_token = -1;   // generation ends after this token (e.g. EOS); -1: never
  int64_t top_k = 0;         // 0: no top-k cut
  float top_p = 1.0f;        // in (0, 1]; 1: no nucleus cut
};

// The token drawn for step i from next-token logits (V).
int32_t sample_token(const float* logits, int64_t V, const SampleOptions& options, uint64_t i);

// Next-token logits (1, T, V) of tokens (1, T) i32.
using LogitsFn = std::function<Tensor(const Tensor& tokens)>;

// Returns only the generated tokens (not the prompt). The prompt must be non-empty.
std::vector<int32_t> generate(const LogitsFn& logits, int64_t vocab_size, const std::vector<int32_t>& prompt,
                              const SampleOptions& options);
// The KV-cache path; options.context is capped at model.max_positions(). Resets the model first.
std::vector<int32_t> generate(InferenceModel& model, const std::vector<int32_t>& prompt, const SampleOptions& options);

}  // namespace moeforge
