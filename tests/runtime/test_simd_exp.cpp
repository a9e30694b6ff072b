// Tests runtime/cpu/simd_exp.h: accuracy against exp in double over the whole finite range, the
// ends (flush to 0, overflow to inf), NaN and infinities, and that a vectorised loop gives the
// same values as scalar calls.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

#include "runtime/cpu/simd_exp.h"

namespace moeforge {
namespace {

using cpu::simd_exp;

TEST(SimdExp, WithinTwoUlpOverTheNormalRange) {
  double worst = 0.0;
  float worst_x = 0.0f;
  const int steps = 2'000'000;
  for (int k = 0; k <= steps; ++k) {
    const float x = static_cast<float>(-87.3 + 175.6 * k / steps);
    const double want = std::exp(static_cast<double>(x));
    const double rel = std::abs(simd_exp(x) - want) / want;
    if (rel > worst) {
      worst = rel;
      worst_x = x;
    }
  }
  EXPECT_LT(worst, 1.2e-7) << "at x = " << worst_x;  // 2 ulp of f32 is 1.19e-7
}

TEST(SimdExp, ExactPointsAndSpecialValues) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  EXPECT_EQ(simd_exp(0.0f), 1.0f);
  EXPECT_EQ(simd_exp(-0.0f), 1.0f);
  EXPECT_EQ(simd_exp(-88.5f), 0.0f);
  EXPECT_EQ(simd_exp(-1e30f), 0.0f);
  EXPECT_EQ(simd_exp(-kInf), 0.0f);
  EXPECT_EQ(simd_exp(88.8f), kInf);
  EXPECT_EQ(simd_exp(1e30f), kInf);
  EXPECT_EQ(simd_exp(kInf), kInf);
  EXPECT_TRUE(std::isnan(simd_exp(std::numeric_limits<float>::quiet_NaN())));
  const double big = std::exp(static_cast<double>(88.3f));
  EXPECT_NEAR(simd_exp(88.3f), big, 1.2e-7 * big);
}

TEST(SimdExp, VectorisedLoopMatchesScalarCalls) {
  std::vector<float> x(1003), y(x.size());
  for (size_t i = 0; i < x.size(); ++i) x[i] = -100.0f + 0.2f * static_cast<float>(i);
  x[17] = std::numeric_limits<float>::quiet_NaN();
#pragma omp simd
  for (size_t i = 0; i < x.size(); ++i) y[i] = simd_exp(x[i]);
  for (size_t i = 0; i < x.size(); ++i) {
    const volatile float xi = x[i];  // keeps this call scalar
    const float want = simd_exp(xi);
    if (std::isnan(want)) {
      EXPECT_TRUE(std::isnan(y[i])) << i;
    } else {
      EXPECT_EQ(y[i], want) << "x = " << x[i];
    }
  }
}

}  // namespace
}  // namespace moeforge
