// Tests checkpoint/placement.cpp: which rank writes each kind of parameter in several layouts
// (exactly one writer per distinct block), stored shapes without padding rows, stored blocks of
// padded shards, and box intersection.
#include <gtest/gtest.h>

#include <set>

#include "checkpoint/placement.h"

namespace moeforge::checkpoint {
namespace {

ParamSpec spec(ShardGroup g) {
  ParamSpec s;
  s.name = "w";
  s.global_shape = {8, 4};
  s.shard_dim = g == ShardGroup::kNone ? -1 : 0;
  s.shard_group = g;
  return s;
}

std::vector<int> writers(ShardGroup g, const ParallelSizes& sizes) {
  std::vector<int> out;
  for (int r = 0; r < sizes.tp * sizes.dp * sizes.pp; ++r)
    if (writes(spec(g), sizes, r)) out.push_back(r);
  return out;
}

TEST(Placement, OneWriterPerDistinctBlock) {
  // tp 2 x dp 2: world rank = dp_rank * 2 + tp_rank.
  const ParallelSizes tp2dp2{.tp = 2, .pp = 1, .dp = 2, .ep = 1};
  EXPECT_EQ(writers(ShardGroup::kTP, tp2dp2), (std::vector<int>{0, 1}));  // dp rank 0, both TP shards
  EXPECT_EQ(writers(ShardGroup::kNone, tp2dp2), (std::vector<int>{0}));   // tp 0 and dp 0
  EXPECT_EQ(writers(ShardGroup::kEP, tp2dp2), (std::vector<int>{0}));     // ep 1: expert-DP is the stage
  // ep 2 over tp 2 x dp 2: EP groups {0,1} {2,3}; expert-DP rank 0 is ranks 0 and 1.
  const ParallelSizes ep2{.tp = 2, .pp = 1, .dp = 2, .ep = 2};
  EXPECT_EQ(writers(ShardGroup::kEP, ep2), (std::vector<int>{0, 1}));
  const ParallelSizes ep4{.tp = 1, .pp = 1, .dp = 4, .ep = 4};
  EXPECT_EQ(writers(ShardGroup::kEP, ep4), (std::vector<int>{0, 1, 2, 3}));
  EXPECT_EQ(writers(ShardGroup::kTP, ep4), (std::vector<int>{0}));
  // Two pipeline stages: each stage's rank 0 writes its own layers.
  const ParallelSizes pp2{.tp = 2, .pp = 2, .dp = 2, .ep = 1};
  EXPECT_EQ(writers(ShardGroup::kNone, pp2), (std::vector<int>{0, 4}));
  EXPECT_EQ(writers(ShardGroup::kTP, pp2), (std::vector<int>{0, 1, 4, 5}));
}

TEST(Placement, StoredShapeAndBlockLeaveOutPadding) {
  // A (260, 4) embedding padded from 259 rows, split over tp 4: rank 3 holds rows [195, 260).
  ParamRegistry reg(ShardLayout{.tp_size = 4, .tp_rank = 3});
  Param& p = reg.add({.name = "embed.weight", .global_shape = {260, 4}, .shard_dim = 0,
                      .shard_group = ShardGroup::kTP, .padded_rows = 1});
  EXPECT_EQ(stored_shape(p.spec), (std::vector<int64_t>{259, 4}));
  const Box b = stored_block(p);
  EXPECT_EQ(b.offset, (std::vector<int64_t>{195, 0}));
  EXPECT_EQ(b.shape, (std::vector<int64_t>{64, 4}));
  // Rank 0's block has no padding.
  ParamRegistry reg0(ShardLayout{.tp_size = 4, .tp_rank = 0});
  Param& p0 = reg0.add({.name = "embed.weight", .global_shape = {260, 4}, .shard_dim = 0,
                        .shard_group = ShardGroup::kTP, .padded_rows = 1});
  EXPECT_EQ(stored_block(p0).shape, (std::vector<int64_t>{65, 4}));
  // A column split (wo over tp): the offset is in dim 1.
  ParamRegistry reg1(ShardLayout{.tp_size = 2, .tp_rank = 1});
  Param& wo = reg1.add({.name = "wo", .global_shape = {6, 8}, .shard_dim = 1, .shard_group = ShardGroup::kTP});
  EXPECT_EQ(stored_block(wo).offset, (std::vector<int64_t>{0, 4}));
  EXPECT_EQ(stored_block(wo).shape, (std::vector<int64_t>{6, 4}));
}

TEST(Placement, Intersect) {
  const Box a{{0, 4}, {10, 4}}, b{{5, 0}, {10, 6}};
  const auto r = intersect(a, b);
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->offset, (std::vector<int64_t>{5, 4}));
  EXPECT_EQ(r->shape, (std::vector<int64_t>{5, 2}));
  EXPECT_EQ(r->numel(), 10);
  EXPECT_FALSE(intersect(Box{{0, 0}, {5, 4}}, Box{{5, 0}, {5, 4}}).has_value());  // touching, not overlapping
  EXPECT_EQ(box_shape_str({3, 4}), "(3, 4)");
}

}  // namespace
}  // namespace moeforge::checkpoint
