#include "launch/generate.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "runtime/rng.h"

namespace moeforge {

namespace {
void check_options(const std::vector<int32_t>& prompt, const SampleOptions& o) {
  MOE_CHECK(!prompt.empty(), "generate: the prompt must hold at least one token");
  MOE_CHECK(o.context > 0, "generate: context must be positive, got {}", o.context);
  MOE_CHECK(o.temperature >= 0.0f, "generate: temperature must be >= 0, got {}", o.temperature);
  MOE_CHECK(o.top_k >= 0, "generate: top_k must be >= 0, got {}", o.top_k);
  MOE_CHECK(o.top_p > 0.0f && o.top_p <= 1.0f, "generate: top_p must be in (0, 1], got {}", o.top_p);
}
}  // namespace

int32_t sample_token(const float* last, int64_t V, const SampleOptions& o, uint64_t i) {
  if (o.temperature == 0.0f) return static_cast<int32_t>(std::max_element(last, last + V) - last);
  // Probabilities of softmax(logits / temperature) in double, most likely first (ties: lower id).
  const float mx = *std::max_element(last, last + V);
  std::vector<double> p(static_cast<size_t>(V));
  for (int64_t v = 0; v < V; ++v) p[static_cast<size_t>(v)] = std::exp((last[v] - mx) / o.temperature);
  std::vector<int32_t> order(static_cast<size_t>(V));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return p[a] > p[b]; });
  size_t keep = o.top_k > 0 ? std::min<size_t>(static_cast<size_t>(o.top_k), order.size()) : order.size();
  if (o.top_p < 1.0f) {
    const double total = std::accumulate(order.begin(), order.begin() + static_cast<long>(keep), 0.0,
                                         [&](double s, int32_t v) { return s + p[v]; });
    double mass = 0.0;
    size_t n = 0;
    while (n < keep && mass < o.top_p * total) mass += p[order[n++]];
    keep = std::max<size_t>(n, 1);
  }
  double sum = 0.0;
  for (size_t k = 0; k < keep; ++k) sum += p[order[k]];
  double u = philox_uniform(philox_key(o.seed, "generate"), i) * sum;
  for (size_t k = 0; k < keep; ++k) {
    u -= p[order[k]];
    if (u <= 0.0) return order[k];
  }
  return order[keep - 1];
}

std::vector<int32_t> generate(const LogitsFn& model, int64_t V, const std::vector<int32_t>& prompt,
                              const SampleOptions& o) {
  check_options(prompt, o);
  std::vector<int32_t> context = prompt;
  std::vector<int32_t> out;
  for (int64_t i = 0; i < o.max_new_tokens; ++i) {
    const int64_t start = std::max<int64_t>(0, static_cast<int64_t>(context.size()) - o.context);
    const int64_t T = static_cast<int64_t>(context.size()) - start;
    const Tensor tokens = Tensor::from_ints({1, T}, std::span<const int32_t>(context.data() + start, static_cast<size_t>(T)));
    const Tensor logits = model(tokens);
    const int32_t next = sample_token(logits.data<float>() + (T - 1) * V, V, o, static_cast<uint64_t>(i));
    out.push_back(next);
    context.push_back(next);
    if (next == o.stop_token) break;
  }
  return out;
}

std::vector<int32_t> generate(InferenceModel& model, const std::vector<int32_t>& prompt, const SampleOptions& o) {
  check_options(prompt, o);
  const int64_t V = model.config().vocab_size, context = std::min(o.context, model.max_positions());
  std::vector<int32_t> all = prompt;
  std::vector<int32_t> out;
  model.reset();
  // Feeds all[from, end): after a restart the cache holds only the tail of the sequence.
  const auto feed = [&](size_t from) {
    return model.forward(std::span<const int32_t>(all.data() + from, all.size() - from));
  };
  Tensor logits = feed(all.size() > static_cast<size_t>(context) ? all.size() - static_cast<size_t>(context) : 0);
  for (int64_t i = 0; i < o.max_new_tokens; ++i) {
    const int32_t next = sample_token(logits.data<float>() + (logits.dim(0) - 1) * V, V, o, static_cast<uint64_t>(i));
    out.push_back(next);
    all.push_back(next);
    if (next == o.stop_token || i + 1 == o.max_new_tokens) break;
    if (model.position() == context) {  // full: keep the last half of the context
      model.reset();
      logits = feed(all.size() - static_cast<size_t>(std::max<int64_t>(1, context / 2)));
    } else {
      logits = model.forward(std::span<const int32_t>(&all.back(), 1));
    }
  }
  return out;
}

}  // namespace moeforge
