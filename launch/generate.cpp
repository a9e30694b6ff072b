#include "launch/generate.h"

#include <algorithm>
#include <cmath>

#include "runtime/rng.h"

namespace moeforge {

std::vector<int32_t> generate(MoeTransformer& model, const std::vector<int32_t>& prompt, const SampleOptions& o) {
  MOE_CHECK(!prompt.empty(), "generate: the prompt must hold at least one token");
  MOE_CHECK(o.context > 0, "generate: context must be positive, got {}", o.context);
  MOE_CHECK(o.temperature >= 0.0f, "generate: temperature must be >= 0, got {}", o.temperature);
  const int64_t V = model.config().vocab_size;
  const PhiloxKey key = philox_key(o.seed, "generate");
  std::vector<int32_t> context = prompt;
  std::vector<int32_t> out;
  for (int64_t i = 0; i < o.max_new_tokens; ++i) {
    const int64_t start = std::max<int64_t>(0, static_cast<int64_t>(context.size()) - o.context);
    const int64_t T = static_cast<int64_t>(context.size()) - start;
    const Tensor tokens = Tensor::from_ints({1, T}, std::span<const int32_t>(context.data() + start, static_cast<size_t>(T)));
    const Tensor logits = model.logits(tokens);
    const float* last = logits.data<float>() + (T - 1) * V;

    int32_t next = 0;
    if (o.temperature == 0.0f) {
      next = static_cast<int32_t>(std::max_element(last, last + V) - last);
    } else {
      // Inverse-CDF sampling from softmax(logits / temperature), accumulated in double.
      const float mx = *std::max_element(last, last + V);
      std::vector<double> p(static_cast<size_t>(V));
      double sum = 0.0;
      for (int64_t v = 0; v < V; ++v) sum += p[static_cast<size_t>(v)] = std::exp((last[v] - mx) / o.temperature);
      double u = philox_uniform(key, static_cast<uint64_t>(i)) * sum;
      next = static_cast<int32_t>(V - 1);
      for (int64_t v = 0; v < V; ++v) {
        u -= p[static_cast<size_t>(v)];
        if (u <= 0.0) {
          next = static_cast<int32_t>(v);
          break;
        }
      }
    }
    out.push_back(next);
    context.push_back(next);
    if (next == o.stop_token) break;
  }
  return out;
}

}  // namespace moeforge
