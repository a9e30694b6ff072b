// Tests models/inference.cpp: the KV-cache decode path gives MoeTransformer::logits' numbers —
// prompt in one call, then token by token, and in uneven chunks — for GQA, tied embeddings,
// shared experts with sigmoid gating and an expert bias, and dense first layers; a full cache is
// an error, reset() starts over.
#include <gtest/gtest.h>

#include "models/inference.h"
#include "models/transformer.h"
#include "tests/testing.h"

namespace moeforge {
namespace {

using testing::error_of;

ModelConfig small(int variant) {
  ModelConfig c;
  c.vocab_size = 259;
  c.dim = 32;
  c.n_layers = 3;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.head_dim = 8;
  c.n_experts = 4;
  c.top_k = 2;
  c.expert_hidden = 24;
  c.rope_theta = 500.0f;  // fast-turning angles: a position error would show
  if (variant == 1) {
    c.tie_embeddings = true;
    c.n_kv_heads = 1;
  }
  if (variant == 2) {
    c.gating = ops::Gating::kSigmoidTopK;
    c.n_shared_experts = 1;
    c.expert_bias_update_rate = 0.01f;
    c.n_dense_layers = 1;
    c.dense_hidden = 40;
  }
  if (variant == 3) {  // attention masks: a window of 6, documents started by token 7
    c.sliding_window = 6;
    c.document_start_token = 7;
  }
  return c;
}

class Inference : public ::testing::TestWithParam<int> {};

TEST_P(Inference, CachedDecodeMatchesFullForward) {
  const ModelConfig cfg = small(GetParam());
  MoeTransformer model(cfg);
  model.registry().init(11);
  // Give norms and a selection bias non-trivial values too.
  for (Param& p : model.registry().params()) {
    if (p.spec.init == ParamInit::kNormal) continue;
    const Tensor r = testing::random_tensor(p.value.shape(), 3 + p.spec.name.size(), 0.5f);
    for (int64_t i = 0; i < p.value.numel(); ++i) p.value.data<float>()[i] += r.data<float>()[i];
  }
  const int64_t T = 23, V = cfg.vocab_size;
  const Tensor tokens = testing::random_ints({1, T}, 5, 0, static_cast<int32_t>(V));
  if (cfg.document_start_token >= 0)  // documents from positions 5 (inside the prompt) and 14
    for (const int64_t t : {int64_t{5}, int64_t{14}}) tokens.data<int32_t>()[t] = cfg.document_start_token;
  const std::vector<float> want = model.logits(tokens).to_floats();
  const std::span<const int32_t> ids(tokens.data<int32_t>(), static_cast<size_t>(T));

  InferenceModel inf(cfg, model.registry(), 32);
  // Prompt of 9, then one at a time.
  std::vector<double> got;
  const auto append = [&](const Tensor& l) {
    for (const float x : l.to_floats()) got.push_back(x);
  };
  append(inf.forward(ids.subspan(0, 9)));
  for (int64_t t = 9; t < T; ++t) append(inf.forward(ids.subspan(static_cast<size_t>(t), 1)));
  EXPECT_EQ(inf.position(), T);
  const std::vector<double> ref(want.begin(), want.end());
  testing::expect_close(got, ref, 1e-5, 1e-5, "prompt + single-token decode");

  // Uneven chunks after a reset.
  inf.reset();
  got.clear();
  for (const auto& [a, b] : std::vector<std::pair<int, int>>{{0, 1}, {1, 6}, {6, 7}, {7, 20}, {20, 23}})
    append(inf.forward(ids.subspan(static_cast<size_t>(a), static_cast<size_t>(b - a))));
  testing::expect_close(got, ref, 1e-5, 1e-5, "chunked decode");
}

INSTANTIATE_TEST_SUITE_P(Variants, Inference, ::testing::Values(0, 1, 2, 3));

TEST(InferenceErrors, CacheOverflowAndShardedRegistry) {
  const ModelConfig cfg = small(0);
  MoeTransformer model(cfg);
  model.registry().init(1);
  InferenceModel inf(cfg, model.registry(), 4);
  const std::vector<int32_t> five{1, 2, 3, 4, 5};
  EXPECT_EQ(error_of([&] { inf.forward(five); }), "InferenceModel::forward: positions 0..4 pass the cache length 4");
  EXPECT_EQ(error_of([&] { inf.forward({}); }), "InferenceModel::forward: no tokens");
  ModelConfig other = cfg;
  other.dim = 16;
  EXPECT_EQ(error_of([&] { InferenceModel bad(other, model.registry(), 4); }),
            "InferenceModel: parameter embed.weight is (259, 32), expected the whole tensor (259, 16) (a single-rank "
            "registry)");
}

}  // namespace
}  // namespace moeforge
