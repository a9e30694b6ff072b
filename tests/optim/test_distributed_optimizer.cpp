// Tests optim/distributed_optimizer.cpp on one rank (the multi-rank behaviour is covered by
// tests/parallel/test_layout_invariance.cpp): the global norm against a double reference over
// parameters of odd shapes (one large enough for the threaded reduction), clipping to exactly the
// max norm with the direction kept, no-op below the threshold and with max_norm 0, a non-finite
// norm, errors, and ZeRO-1 on one rank updating exactly as stage 0.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

#include "optim/distributed_optimizer.h"
#include "runtime/ops.h"
#include "tests/data/temp_dir.h"
#include "tests/testing.h"

namespace moeforge {
namespace {

using testing::error_of;

// Parameters of several shapes with random gradients of different scales; one has more than
// 2^16 elements so the OpenMP path of the reduction runs.
void make_params(ParamRegistry& reg, float scale) {
  reg.add({.name = "embed", .global_shape = {300, 257}});
  reg.add({.name = "layers.0.attn.wq", .global_shape = {7, 13}});
  reg.add({.name = "layers.0.norm", .global_shape = {13}, .weight_decay = false});
  reg.add({.name = "layers.0.moe.experts.w1", .global_shape = {3, 5, 9}});
  uint64_t seed = 1;
  for (Param& p : reg.params()) {
    ops::copy(testing::random_tensor(p.grad.shape(), seed, scale / static_cast<float>(seed)), p.grad);
    ++seed;
  }
}

double clip_grad_norm(ParamRegistry& reg, double max_norm, int zero_stage = 0) {
  DistributedOptimizer opt(reg, ProcessGrid::single(), AdamWOptions{}, zero_stage);
  return opt.clip_grad_norm(max_norm);
}

double reference_norm(const ParamRegistry& reg) {
  double sum = 0.0;
  for (const Param& p : reg.params()) {
    for (double g : testing::to_double(p.grad)) sum += g * g;
  }
  return std::sqrt(sum);
}

std::vector<std::vector<float>> grads_of(const ParamRegistry& reg) {
  std::vector<std::vector<float>> out;
  for (const Param& p : reg.params()) out.push_back(p.grad.to_floats());
  return out;
}

TEST(DistributedOptimizer, GlobalNormMatchesDoubleReference) {
  ParamRegistry reg;
  make_params(reg, 1.0f);
  const double want = reference_norm(reg);
  EXPECT_NEAR(clip_grad_norm(reg, 0.0), want, 1e-12 * want);
  EXPECT_NEAR(clip_grad_norm(reg, 0.0, /*zero_stage=*/1), want, 1e-12 * want);
  EXPECT_GT(want, 50.0);  // the values the clip tests below rely on
  ParamRegistry empty;
  EXPECT_EQ(clip_grad_norm(empty, 0.0), 0.0);
}

TEST(DistributedOptimizer, ClipsToMaxNormKeepingDirection) {
  ParamRegistry reg;
  make_params(reg, 1.0f);
  const double before = reference_norm(reg);
  const auto old = grads_of(reg);
  const double max_norm = before / 3.0;
  EXPECT_NEAR(clip_grad_norm(reg, max_norm), before, 1e-12 * before);  // returns the norm before
  EXPECT_NEAR(reference_norm(reg), max_norm, 1e-6 * max_norm);
  // Every element scaled by the same factor max_norm / (norm + 1e-6).
  const double factor = max_norm / (before + 1e-6);
  size_t i = 0;
  for (const Param& p : reg.params()) {
    const std::vector<float> now = p.grad.to_floats();
    for (size_t j = 0; j < now.size(); ++j) {
      ASSERT_NEAR(now[j], old[i][j] * factor, 2e-7 * std::abs(old[i][j]) + 1e-12) << p.spec.name << "[" << j << "]";
    }
    ++i;
  }
}

TEST(DistributedOptimizer, NoOpBelowThresholdOrDisabled) {
  ParamRegistry reg;
  make_params(reg, 1.0f);
  const double norm = reference_norm(reg);
  const auto old = grads_of(reg);
  EXPECT_NEAR(clip_grad_norm(reg, 2.0 * norm), norm, 1e-12 * norm);
  EXPECT_EQ(grads_of(reg), old);
  EXPECT_NEAR(clip_grad_norm(reg, 0.0), norm, 1e-12 * norm);  // 0 disables, however large the norm
  EXPECT_EQ(grads_of(reg), old);
}

TEST(DistributedOptimizer, NonFiniteNormLeavesGradientsForTheCaller) {
  ParamRegistry reg;
  make_params(reg, 1.0f);
  reg.get("layers.0.attn.wq").grad.data<float>()[5] = std::numeric_limits<float>::infinity();
  const auto old = grads_of(reg);
  EXPECT_TRUE(std::isinf(clip_grad_norm(reg, 1.0)));
  EXPECT_EQ(grads_of(reg), old);
  reg.get("layers.0.norm").grad.data<float>()[0] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_TRUE(std::isnan(clip_grad_norm(reg, 1.0)));
}

TEST(DistributedOptimizer, RejectsBadMaxNorm) {
  ParamRegistry reg;
  make_params(reg, 1.0f);
  EXPECT_EQ(error_of([&] { clip_grad_norm(reg, -1.0); }), "optim.grad_clip must be finite and >= 0, got -1");
  EXPECT_EQ(error_of([&] { clip_grad_norm(reg, std::numeric_limits<double>::infinity()); }),
            "optim.grad_clip must be finite and >= 0, got inf");
}

TEST(DistributedOptimizer, ZeroOneOnOneRankStepsLikeStageZero) {
  ParamRegistry a, b;
  make_params(a, 1.0f);
  make_params(b, 1.0f);
  DistributedOptimizer plain(a, ProcessGrid::single(), AdamWOptions{}, 0);
  DistributedOptimizer zero(b, ProcessGrid::single(), AdamWOptions{}, 1);
  for (int s = 0; s < 3; ++s) {
    plain.reduce_gradients();
    zero.reduce_gradients();
    EXPECT_EQ(plain.clip_grad_norm(1.0), zero.clip_grad_norm(1.0));
    plain.step(1e-2f);
    zero.step(1e-2f);
  }
  for (const Param& p : a.params()) EXPECT_EQ(p.value.to_floats(), b.get(p.spec.name).value.to_floats()) << p.spec.name;
  EXPECT_EQ(zero.adamw().owned_range("embed").size(), 300 * 257);
}

TEST(DistributedOptimizer, RejectsBadZeroStage) {
  ParamRegistry reg;
  make_params(reg, 1.0f);
  EXPECT_EQ(error_of([&] { DistributedOptimizer(reg, ProcessGrid::single(), AdamWOptions{}, 2); }),
            "parallel.zero_stage must be 0 or 1, got 2");
}

}  // namespace
}  // namespace moeforge
