// Tests optim/grad_clip.cpp: the global norm against a double reference over parameters of odd
// shapes (one large enough for the threaded reduction), clipping to exactly the max norm with the
// direction kept, no-op below the threshold and with max_norm 0, a non-finite norm, and errors.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

#include "optim/grad_clip.h"
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

TEST(GradClip, GlobalNormMatchesDoubleReference) {
  ParamRegistry reg;
  make_params(reg, 1.0f);
  const double want = reference_norm(reg);
  EXPECT_NEAR(global_grad_norm(reg), want, 1e-12 * want);
  EXPECT_GT(want, 50.0);  // the values the clip tests below rely on
  ParamRegistry empty;
  EXPECT_EQ(global_grad_norm(empty), 0.0);
}

TEST(GradClip, ClipsToMaxNormKeepingDirection) {
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

TEST(GradClip, NoOpBelowThresholdOrDisabled) {
  ParamRegistry reg;
  make_params(reg, 1.0f);
  const double norm = reference_norm(reg);
  const auto old = grads_of(reg);
  EXPECT_NEAR(clip_grad_norm(reg, 2.0 * norm), norm, 1e-12 * norm);
  EXPECT_EQ(grads_of(reg), old);
  EXPECT_NEAR(clip_grad_norm(reg, 0.0), norm, 1e-12 * norm);  // 0 disables, however large the norm
  EXPECT_EQ(grads_of(reg), old);
}

TEST(GradClip, NonFiniteNormLeavesGradientsForTheCaller) {
  ParamRegistry reg;
  make_params(reg, 1.0f);
  reg.get("layers.0.attn.wq").grad.data<float>()[5] = std::numeric_limits<float>::infinity();
  const auto old = grads_of(reg);
  EXPECT_TRUE(std::isinf(clip_grad_norm(reg, 1.0)));
  EXPECT_EQ(grads_of(reg), old);
  reg.get("layers.0.norm").grad.data<float>()[0] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_TRUE(std::isnan(clip_grad_norm(reg, 1.0)));
}

TEST(GradClip, RejectsBadMaxNorm) {
  ParamRegistry reg;
  make_params(reg, 1.0f);
  EXPECT_EQ(error_of([&] { clip_grad_norm(reg, -1.0); }), "clip_grad_norm: max_norm must be finite and >= 0, got -1");
  EXPECT_EQ(error_of([&] { clip_grad_norm(reg, std::numeric_limits<double>::infinity()); }),
            "clip_grad_norm: max_norm must be finite and >= 0, got inf");
}

}  // namespace
}  // namespace moeforge
