// Tests runtime/rng.cpp: Philox-4x32-10 against Random123's known-answer vectors, the normal
// and uniform streams' statistics, stream separation by name and seed, and the property layout
// invariance rests on: init_normal() of any shard equals, bit for bit, that slice of the
// single-rank init of the global tensor.
#include <gtest/gtest.h>

#include <array>
#include <bit>
#include <cmath>
#include <cstring>
#include <functional>
#include <numbers>
#include <string>
#include <vector>

#include "runtime/rng.h"

namespace moeforge {
namespace {

// ---- Philox known answers (Random123 kat_vectors, philox4x32 10 rounds) ---------------------

TEST(Philox, KnownAnswerZero) {
  const PhiloxBlock got = philox4x32({0, 0, 0, 0}, {0, 0});
  EXPECT_EQ(got, (PhiloxBlock{0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}));
}

TEST(Philox, KnownAnswerAllOnes) {
  const PhiloxBlock got = philox4x32({0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}, {0xffffffffu, 0xffffffffu});
  EXPECT_EQ(got, (PhiloxBlock{0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}));
}

TEST(Philox, KnownAnswerPi) {
  const PhiloxBlock got =
      philox4x32({0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}, {0xa4093822u, 0x299f31d0u});
  EXPECT_EQ(got, (PhiloxBlock{0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}));
}

// ---- stream statistics --------------------------------------------------------------------

TEST(Philox, NormalStreamHasUnitMoments) {
  const PhiloxKey key = philox_key(1234, "stats");
  constexpr int64_t n = 1'000'000;
  double sum = 0.0, sum_sq = 0.0;
  int64_t beyond_3 = 0, below_m1 = 0, in_0_half = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double x = philox_normal(key, static_cast<uint64_t>(i));
    ASSERT_TRUE(std::isfinite(x)) << i;
    sum += x;
    sum_sq += x * x;
    beyond_3 += std::fabs(x) > 3.0;
    below_m1 += x < -1.0;
    in_0_half += x >= 0.0 && x < 0.5;
  }
  const double mean = sum / n;
  const double std = std::sqrt(sum_sq / n - mean * mean);
  // Standard errors at n = 1e6: mean 1e-3, std 7e-4, tail fraction 5e-5, bin fractions 4e-4.
  EXPECT_NEAR(mean, 0.0, 5e-3);
  EXPECT_NEAR(std, 1.0, 5e-3);
  EXPECT_NEAR(static_cast<double>(beyond_3) / n, std::erfc(3.0 / std::sqrt(2.0)), 3e-4);  // 0.0027
  EXPECT_NEAR(static_cast<double>(below_m1) / n, 0.5 * std::erfc(1.0 / std::sqrt(2.0)), 2e-3);  // 0.1587
  EXPECT_NEAR(static_cast<double>(in_0_half) / n, 0.5 * std::erf(0.5 / std::sqrt(2.0)), 2e-3);  // 0.1915
}

TEST(Philox, UniformStreamIsOpenUnitInterval) {
  const PhiloxKey key = philox_key(7, "uniform");
  constexpr int64_t n = 200'000;
  double sum = 0.0;
  int64_t below_tenth = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double u = philox_uniform(key, static_cast<uint64_t>(i));
    ASSERT_GT(u, 0.0);
    ASSERT_LT(u, 1.0);
    sum += u;
    below_tenth += u < 0.1;
  }
  EXPECT_NEAR(sum / n, 0.5, 3e-3);
  EXPECT_NEAR(static_cast<double>(below_tenth) / n, 0.1, 3e-3);
}

// ---- stream separation ------------------------------------------------------------------------

int64_t count_equal(PhiloxKey a, PhiloxKey b, int64_t n) {
  int64_t same = 0;
  for (int64_t i = 0; i < n; ++i) same += philox_normal(a, i) == philox_normal(b, i);
  return same;
}

TEST(Philox, NamesAndSeedsSelectDifferentStreams) {
  const PhiloxKey base = philox_key(1, "layers.0.attn.wq");
  EXPECT_EQ(base, philox_key(1, "layers.0.attn.wq"));  // deterministic
  const PhiloxKey others[] = {philox_key(2, "layers.0.attn.wq"), philox_key(0, "layers.0.attn.wq"),
                              philox_key(1, "layers.0.attn.wk"), philox_key(1, "layers.1.attn.wq"),
                              philox_key(1, "layers.0.attn.wq "), philox_key(1, "")};
  for (const PhiloxKey& k : others) {
    EXPECT_NE(k, base);
    EXPECT_EQ(count_equal(base, k, 1000), 0);
  }
  // Seeds 1 and 1 + 2^32 differ only in the high word.
  EXPECT_NE(philox_key(1, "w"), philox_key(1 + (uint64_t{1} << 32), "w"));
  EXPECT_NE(philox_key(1, "ab"), philox_key(1, "ba"));
  // Indices past 2^32 use the counter's second word, not a wrap-around.
  const PhiloxKey k = philox_key(3, "big");
  EXPECT_NE(philox_normal(k, 5), philox_normal(k, 5 + (uint64_t{1} << 32)));
}

TEST(Philox, NormalIsBoxMullerOfTheBlock) {
  // Pins the documented mapping (the CUDA init must reproduce it): block at counter
  // (index lo, index hi, 0, 0), u = (word + 0.5) / 2^32, sqrt(-2 ln u1) cos(2 pi u2).
  const PhiloxKey key = philox_key(42, "mapping");
  for (uint64_t index : {uint64_t{0}, uint64_t{17}, (uint64_t{3} << 32) + 9}) {
    const PhiloxBlock b =
        philox4x32({static_cast<uint32_t>(index), static_cast<uint32_t>(index >> 32), 0, 0}, key);
    const double u1 = (b[0] + 0.5) / 4294967296.0;
    const double u2 = (b[1] + 0.5) / 4294967296.0;
    const double want = std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * std::numbers::pi * u2);
    EXPECT_NEAR(philox_normal(key, index), want, 1e-6 * (1.0 + std::fabs(want))) << index;
    EXPECT_DOUBLE_EQ(philox_uniform(key, index), u1) << index;
  }
}

// ---- sharded init equals slices of the full init ----------------------------------------

constexpr uint64_t kSeed = 2024;
constexpr float kStd = 0.02f;

Tensor full_init(const Shape& shape, const char* name) {
  Tensor t = Tensor::empty(shape, DType::kF32);
  init_normal(t, kSeed, name, ShardSlice::whole(shape), kStd);
  return t;
}

// Initialises a local block of `local` shape at `offset` and compares it bitwise with the same
// block cut out of the full tensor `full`.
void expect_block_matches(const Tensor& full, const char* name, const Shape& local,
                          std::array<int64_t, Shape::kMaxDims> offset) {
  Tensor shard = Tensor::empty(local, DType::kF32);
  init_normal(shard, kSeed, name, ShardSlice{full.shape(), offset}, kStd);
  const int nd = local.ndim();
  const float* got = shard.data<float>();
  const float* all = full.data<float>();
  std::array<int64_t, Shape::kMaxDims> idx{};
  for (int64_t i = 0; i < shard.numel(); ++i) {
    // idx: the local multi-index of element i; g: the global linear index of that element.
    int64_t rem = i;
    for (int d = nd - 1; d >= 0; --d) {
      idx[d] = rem % local[d];
      rem /= local[d];
    }
    int64_t g = 0;
    for (int d = 0; d < nd; ++d) g = g * full.dim(d) + idx[d] + offset[d];
    ASSERT_EQ(std::bit_cast<uint32_t>(got[i]), std::bit_cast<uint32_t>(all[g]))
        << name << " local " << local.str() << " element " << i << " (global " << g << ")";
  }
}

TEST(InitNormal, FullTensorIsStdTimesTheStreamInRowMajorOrder) {
  const Tensor full = full_init({12, 10}, "w2d");
  const PhiloxKey key = philox_key(kSeed, "w2d");
  const float* p = full.data<float>();
  for (int64_t g = 0; g < full.numel(); ++g)
    ASSERT_EQ(std::bit_cast<uint32_t>(p[g]), std::bit_cast<uint32_t>(kStd * philox_normal(key, g))) << g;
  // Another seed gives another tensor.
  Tensor other = Tensor::empty({12, 10}, DType::kF32);
  init_normal(other, kSeed + 1, "w2d", ShardSlice::whole(other.shape()), kStd);
  EXPECT_NE(other.to_floats(), full.to_floats());
}

TEST(InitNormal, TwoDimRowShards) {
  const Tensor full = full_init({12, 10}, "w2d");
  for (int64_t r = 0; r < 12; r += 4) expect_block_matches(full, "w2d", {4, 10}, {r, 0});
}

TEST(InitNormal, TwoDimColumnShardsOfUnequalWidth) {
  const Tensor full = full_init({12, 10}, "w2d");
  expect_block_matches(full, "w2d", {12, 4}, {0, 0});
  expect_block_matches(full, "w2d", {12, 3}, {0, 4});
  expect_block_matches(full, "w2d", {12, 3}, {0, 7});
}

TEST(InitNormal, TwoDimInteriorBlock) {
  const Tensor full = full_init({12, 10}, "w2d");
  expect_block_matches(full, "w2d", {5, 3}, {4, 6});
  expect_block_matches(full, "w2d", {1, 1}, {11, 9});
}

TEST(InitNormal, ExpertTensorShardedAlongExpertsAndHidden) {
  const Tensor full = full_init({4, 6, 5}, "experts.w1");  // (E, F, C)
  expect_block_matches(full, "experts.w1", {2, 6, 5}, {0, 0, 0});
  expect_block_matches(full, "experts.w1", {2, 6, 5}, {2, 0, 0});
  for (int64_t f = 0; f < 6; f += 2) expect_block_matches(full, "experts.w1", {4, 2, 5}, {0, f, 0});
  expect_block_matches(full, "experts.w1", {1, 3, 2}, {3, 2, 3});
}

TEST(InitNormal, OneDimShards) {
  const Tensor full = full_init({17}, "bias");
  expect_block_matches(full, "bias", {6}, {0});
  expect_block_matches(full, "bias", {6}, {6});
  expect_block_matches(full, "bias", {5}, {12});
}

TEST(InitNormal, ShardsTileTheFullTensor) {
  // The three column shards, written into one buffer side by side, rebuild the full tensor.
  const Tensor full = full_init({12, 10}, "w2d");
  std::vector<float> rebuilt(120, NAN);
  const int64_t offsets[] = {0, 4, 7}, widths[] = {4, 3, 3};
  for (int s = 0; s < 3; ++s) {
    Tensor shard = Tensor::empty({12, widths[s]}, DType::kF32);
    init_normal(shard, kSeed, "w2d", ShardSlice{full.shape(), {0, offsets[s]}}, kStd);
    for (int64_t r = 0; r < 12; ++r)
      for (int64_t c = 0; c < widths[s]; ++c) rebuilt[r * 10 + offsets[s] + c] = shard.data<float>()[r * widths[s] + c];
  }
  EXPECT_EQ(std::memcmp(rebuilt.data(), full.data<float>(), 120 * sizeof(float)), 0);
}

TEST(InitNormal, WritesThroughARowsView) {
  // The local tensor may itself be a view (e.g. one expert of a local expert buffer).
  const Tensor full = full_init({4, 6, 5}, "experts.w1");
  const Tensor buffer = Tensor::zeros({3, 6, 5}, DType::kF32);
  init_normal(buffer.rows(1, 3), kSeed, "experts.w1", ShardSlice{full.shape(), {2, 0, 0}}, kStd);
  const std::vector<float> b = buffer.to_floats();
  for (int64_t i = 0; i < 30; ++i) EXPECT_EQ(b[i], 0.0f) << "row 0 must stay untouched";
  EXPECT_EQ(std::memcmp(b.data() + 30, full.data<float>() + 60, 60 * sizeof(float)), 0);
}

TEST(InitNormal, ZeroSizedShardIsFine) {
  const Tensor empty = Tensor::empty({0, 10}, DType::kF32);
  EXPECT_NO_THROW(init_normal(empty, kSeed, "w2d", ShardSlice{{12, 10}, {12, 0}}, kStd));
}

// ---- errors ----------------------------------------------------------------------------------

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "no error";
}

TEST(InitNormal, BlockPastTheGlobalShapeNamesTensorAndShapes) {
  const Tensor t = Tensor::empty({4, 4}, DType::kF32);
  EXPECT_EQ(error_of([&] { init_normal(t, kSeed, "layers.0.w", ShardSlice{{12, 10}, {0, 7}}, kStd); }),
            "init_normal(layers.0.w): local shape (4, 4) at offset 7 along dim 1 exceeds global shape (12, 10)");
  EXPECT_EQ(error_of([&] { init_normal(t, kSeed, "layers.0.w", ShardSlice{{12, 10}, {9, 0}}, kStd); }),
            "init_normal(layers.0.w): local shape (4, 4) at offset 9 along dim 0 exceeds global shape (12, 10)");
  EXPECT_EQ(error_of([&] { init_normal(t, kSeed, "layers.0.w", ShardSlice{{12, 10}, {-1, 0}}, kStd); }),
            "init_normal(layers.0.w): local shape (4, 4) at offset -1 along dim 0 exceeds global shape (12, 10)");
  const Tensor big = Tensor::empty({13, 10}, DType::kF32);
  EXPECT_THROW(init_normal(big, kSeed, "w", ShardSlice::whole({12, 10}), kStd), Error);
}

TEST(InitNormal, RankMismatchNamesTensorAndShapes) {
  const Tensor t = Tensor::empty({4, 4}, DType::kF32);
  EXPECT_EQ(error_of([&] { init_normal(t, kSeed, "emb", ShardSlice::whole({16}), kStd); }),
            "init_normal(emb): local shape (4, 4) and global shape (16) differ in rank");
}

TEST(InitNormal, RejectsNonF32) {
  const Tensor t = Tensor::empty({4}, DType::kBF16);
  EXPECT_EQ(error_of([&] { init_normal(t, kSeed, "w", ShardSlice::whole({4}), kStd); }),
            "init_normal(w): needs a CPU f32 tensor, got bf16(4) cpu");
}

}  // namespace
}  // namespace moeforge
