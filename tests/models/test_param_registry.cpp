// Tests models/param_registry.cpp: local shards under TP and EP layouts are exactly the slices
// of the single-rank initialisation, names are unique, and bad shardings are rejected.
#include <gtest/gtest.h>

#include "models/param_registry.h"
#include "models/transformer.h"
#include "tests/testing.h"

namespace moeforge {
namespace {

ModelConfig small_config() {
  ModelConfig c;
  c.vocab_size = 20;
  c.dim = 8;
  c.n_layers = 2;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.head_dim = 4;
  c.n_experts = 4;
  c.top_k = 2;
  c.expert_hidden = 6;
  c.n_shared_experts = 1;
  return c;
}

// Value of element `local` of shard p inside the full tensor `full` (same name, whole layout).
float global_value(const Param& full, const Param& p, int64_t local) {
  const Shape& ls = p.value.shape();
  const Shape& gs = full.value.shape();
  int64_t rem = local, g = 0;
  std::array<int64_t, Shape::kMaxDims> idx{};
  for (int d = ls.ndim() - 1; d >= 0; --d) {
    idx[d] = rem % ls[d];
    rem /= ls[d];
  }
  for (int d = 0; d < ls.ndim(); ++d) g = g * gs[d] + idx[d] + p.slice.offset[d];
  return full.value.data<float>()[g];
}

TEST(ParamRegistry, ShardsAreSlicesOfTheSingleRankInit) {
  MoeTransformer whole(small_config());
  whole.registry().init(42);
  for (const auto& [tp, ep] : std::vector<std::pair<int, int>>{{2, 1}, {1, 2}, {2, 4}}) {
    for (int tp_rank = 0; tp_rank < tp; ++tp_rank) {
      for (int ep_rank = 0; ep_rank < ep; ++ep_rank) {
        // The model's own parameter specs, registered under this rank's layout.
        ParamRegistry shard(ShardLayout{tp, tp_rank, ep, ep_rank});
        for (const Param& p : whole.registry().params()) shard.add(p.spec);
        shard.init(42);
        for (const Param& p : shard.params()) {
          const Param& full = whole.registry().get(p.spec.name);
          const int64_t expect_split = p.spec.shard_group == ShardGroup::kTP ? tp
                                       : p.spec.shard_group == ShardGroup::kEP ? ep
                                                                               : 1;
          EXPECT_EQ(p.value.numel() * expect_split, full.value.numel()) << p.spec.name;
          for (int64_t i = 0; i < p.value.numel(); ++i)
            ASSERT_EQ(p.value.data<float>()[i], global_value(full, p, i)) << p.spec.name << " element " << i;
        }
      }
    }
  }
}

TEST(ParamRegistry, CanonicalNamesShapesAndSharding) {
  MoeTransformer model(small_config());
  const ParamRegistry& r = model.registry();
  EXPECT_EQ(r.get("embed.weight").spec.global_shape, Shape({20, 8}));
  EXPECT_EQ(r.get("layers.1.attn.wq").spec.global_shape, Shape({16, 8}));
  EXPECT_EQ(r.get("layers.1.attn.wk").spec.global_shape, Shape({8, 8}));
  EXPECT_EQ(r.get("layers.1.attn.wo").spec.shard_dim, 1);
  EXPECT_EQ(r.get("layers.0.moe.experts.w1").spec.global_shape, Shape({4, 6, 8}));
  EXPECT_EQ(r.get("layers.0.moe.experts.w2").spec.global_shape, Shape({4, 8, 6}));
  EXPECT_TRUE(r.get("layers.0.moe.experts.w2").spec.expert);
  EXPECT_EQ(r.get("layers.0.moe.experts.w2").spec.shard_group, ShardGroup::kEP);
  EXPECT_EQ(r.get("layers.0.moe.shared.w1").spec.global_shape, Shape({6, 8}));
  EXPECT_EQ(r.get("layers.0.moe.shared.w1").spec.shard_group, ShardGroup::kNone);  // whole, like the experts
  EXPECT_EQ(r.get("embed.weight").spec.padded_rows, 0);
  EXPECT_FALSE(r.get("final_norm.weight").spec.weight_decay);
  EXPECT_TRUE(r.contains("lm_head.weight"));
  // 2 layers x (2 norms + 4 attention + router + 3 experts + 3 shared) + embed + final norm + head
  EXPECT_EQ(r.params().size(), 2u * 13u + 3u);
  const int64_t per_layer = 2 * 8 + (16 + 8 + 8) * 8 + 8 * 16 + 4 * 8 + 3 * 4 * 6 * 8 + 3 * 6 * 8;
  EXPECT_EQ(r.global_numel(), 2 * per_layer + 20 * 8 + 8 + 20 * 8);
}

TEST(ParamRegistry, RejectsDuplicatesAndUnevenSplits) {
  ParamRegistry r(ShardLayout{3, 0, 1, 0});
  r.add({.name = "a", .global_shape = {6, 2}, .shard_dim = 0, .shard_group = ShardGroup::kTP});
  try {
    r.add({.name = "a", .global_shape = {6, 2}});
    FAIL();
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(), "parameter a is registered twice");
  }
  try {
    r.add({.name = "b", .global_shape = {4, 2}, .shard_dim = 0, .shard_group = ShardGroup::kTP});
    FAIL();
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(), "parameter b: dim 0 of shape (4, 2) does not divide over 3 TP ranks");
  }
  try {
    r.get("missing");
    FAIL();
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(), "no parameter named missing");
  }
}

TEST(ModelConfig, ValidationNamesTheField) {
  ModelConfig c = small_config();
  c.n_kv_heads = 3;
  try {
    c.validate();
    FAIL();
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(), "model.n_heads (4) must be a positive multiple of model.n_kv_heads (3)");
  }
  c = small_config();
  c.top_k = 5;
  try {
    c.validate();
    FAIL();
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(), "model.top_k (5) must be in [1, model.n_experts = 4]");
  }
}

}  // namespace
}  // namespace moeforge
