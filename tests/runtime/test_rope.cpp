// Tests rope_fwd / rope_bwd (runtime/ops_dense.cpp, runtime/cpu/rope.cpp): the forward against a
// naive double rotation of (i, i + D/2) pairs and against the Hugging Face formulation
// x * cos + rotate_half(x) * sin, the in-place (aliased) paths, the backward against finite
// differences, rope_bwd(rope_fwd(x)) == x, long sequences, and the argument errors.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "runtime/ops.h"
#include "tests/testing.h"

namespace moeforge {
namespace {

using testing::expect_close;
using testing::random_tensor;
using testing::to_double;

using testing::error_of;

// x (B, T, H, D): pair (i, i + D/2) rotated by t * theta^(-2i/D).
std::vector<double> ref_rope(const std::vector<double>& x, const Shape& s, double theta) {
  const int64_t bsz = s[0], t = s[1], h = s[2], d = s[3], half = d / 2;
  std::vector<double> out(x.size());
  for (int64_t b = 0; b < bsz; ++b)
    for (int64_t pos = 0; pos < t; ++pos)
      for (int64_t hh = 0; hh < h; ++hh) {
        const int64_t base = ((b * t + pos) * h + hh) * d;
        for (int64_t i = 0; i < half; ++i) {
          const double angle = static_cast<double>(pos) * std::pow(theta, -2.0 * static_cast<double>(i) / d);
          const double x1 = x[base + i], x2 = x[base + i + half];
          out[base + i] = x1 * std::cos(angle) - x2 * std::sin(angle);
          out[base + i + half] = x2 * std::cos(angle) + x1 * std::sin(angle);
        }
      }
  return out;
}

// transformers' apply_rotary_pos_emb: emb = cat(freqs, freqs); x * cos(emb) + rotate_half(x) * sin(emb)
// with rotate_half(x) = cat(-x[D/2:], x[:D/2]).
std::vector<double> ref_rope_rotate_half(const std::vector<double>& x, const Shape& s, double theta) {
  const int64_t t = s[1], h = s[2], d = s[3], half = d / 2;
  std::vector<double> out(x.size());
  for (size_t row = 0; row < x.size() / d; ++row) {
    const int64_t pos = static_cast<int64_t>(row / h) % t;
    const double* xr = x.data() + row * d;
    std::vector<double> rotated(d), emb(d);
    for (int64_t j = 0; j < d; ++j) {
      rotated[j] = j < half ? -xr[j + half] : xr[j - half];
      const double inv_freq = 1.0 / std::pow(theta, static_cast<double>(2 * (j % half)) / d);
      emb[j] = static_cast<double>(pos) * inv_freq;
    }
    for (int64_t j = 0; j < d; ++j) out[row * d + j] = xr[j] * std::cos(emb[j]) + rotated[j] * std::sin(emb[j]);
  }
  return out;
}

struct RopeCase {
  Shape shape;
  float theta;
};

std::string case_name(const ::testing::TestParamInfo<RopeCase>& test) {
  const Shape& s = test.param.shape;
  return fmt::format("B{}_T{}_H{}_D{}_theta{}", s[0], s[1], s[2], s[3], static_cast<int64_t>(test.param.theta));
}

class RopeTest : public ::testing::TestWithParam<RopeCase> {};

TEST_P(RopeTest, ForwardMatchesBothDoubleFormulations) {
  const RopeCase p = GetParam();
  const Tensor x = random_tensor(p.shape, 1);
  const Tensor out = Tensor::empty(p.shape, DType::kF32);
  ops::rope_fwd(x, p.theta, out);
  const std::vector<double> pairs = ref_rope(to_double(x), p.shape, p.theta);
  const std::vector<double> hf = ref_rope_rotate_half(to_double(x), p.shape, p.theta);
  expect_close(hf, pairs, 1e-12, 1e-12, "rotate_half reference vs pair reference");
  expect_close(out, hf, 1e-5, 1e-6, "rope_fwd");
}

TEST_P(RopeTest, InPlaceEqualsOutOfPlace) {
  const RopeCase p = GetParam();
  const Tensor x = random_tensor(p.shape, 2);
  const Tensor out = Tensor::empty(p.shape, DType::kF32);
  ops::rope_fwd(x, p.theta, out);
  const Tensor y = x.clone();
  ops::rope_fwd(y, p.theta, y);
  expect_close(y, to_double(out), 0.0, 0.0, "rope_fwd in place");

  const Tensor dx = Tensor::empty(p.shape, DType::kF32);
  ops::rope_bwd(x, p.theta, dx);
  const Tensor dy = x.clone();
  ops::rope_bwd(dy, p.theta, dy);
  expect_close(dy, to_double(dx), 0.0, 0.0, "rope_bwd in place");
}

TEST_P(RopeTest, BackwardInvertsForward) {
  const RopeCase p = GetParam();
  const Tensor x = random_tensor(p.shape, 6);
  const Tensor y = x.clone();
  ops::rope_fwd(y, p.theta, y);
  ops::rope_bwd(y, p.theta, y);
  expect_close(y, to_double(x), 1e-6, 1e-6, "rope_bwd(rope_fwd(x))");
}

INSTANTIATE_TEST_SUITE_P(Shapes, RopeTest,
                         ::testing::Values(RopeCase{{1, 1, 1, 2}, 10000.0f}, RopeCase{{2, 5, 3, 8}, 10000.0f},
                                           RopeCase{{1, 7, 2, 6}, 10000.0f}, RopeCase{{3, 4, 1, 10}, 100.0f},
                                           RopeCase{{2, 33, 4, 64}, 10000.0f}, RopeCase{{1, 300, 2, 16}, 1e6f}),
                         case_name);

// Finite differences cost O(numel^2): small shapes only.
class RopeGradTest : public ::testing::TestWithParam<RopeCase> {};

TEST_P(RopeGradTest, BackwardMatchesFiniteDifferences) {
  const RopeCase p = GetParam();
  const Tensor x = random_tensor(p.shape, 3);
  const Tensor g = random_tensor(p.shape, 4);
  const std::vector<double> gv = to_double(g);
  const std::vector<double> fd = testing::finite_diff(
      [&](const std::vector<double>& xp) { return testing::dot(ref_rope(xp, p.shape, p.theta), gv); }, to_double(x));
  const Tensor dx = random_tensor(p.shape, 5);
  ops::rope_bwd(g, p.theta, dx);
  expect_close(dx, fd, 1e-4, 1e-5, "rope_bwd");
}

INSTANTIATE_TEST_SUITE_P(Shapes, RopeGradTest,
                         ::testing::Values(RopeCase{{1, 1, 1, 2}, 10000.0f}, RopeCase{{2, 5, 3, 8}, 10000.0f},
                                           RopeCase{{1, 7, 2, 6}, 10000.0f}, RopeCase{{3, 4, 1, 10}, 100.0f}),
                         case_name);

TEST(Rope, LongSequenceAnglesStayAccurate) {
  // theta = 2 with D = 4 gives the pair i = 1 the irrational frequency 2^(-1/2), so angles reach
  // ~5800 radians, where an f32 angle (or an f32 inv_freq) would be off by ~5e-4.
  const Shape shape{1, 8192, 1, 4};
  const Tensor x = random_tensor(shape, 7);
  const Tensor out = Tensor::empty(shape, DType::kF32);
  ops::rope_fwd(x, 2.0f, out);
  expect_close(out, ref_rope(to_double(x), shape, 2.0), 1e-6, 2e-6, "rope_fwd at T = 8192");
}

TEST(Rope, ArgumentErrors) {
  const Tensor x = random_tensor({2, 3, 4, 5}, 1);
  EXPECT_EQ(error_of([&] { ops::rope_fwd(x, 10000.0f, x); }),
            "rope_fwd: the head dim D of x must be even, got x of shape (2, 3, 4, 5)");
  EXPECT_EQ(error_of([&] { ops::rope_bwd(x, 10000.0f, x); }),
            "rope_bwd: the head dim D of dout must be even, got dout of shape (2, 3, 4, 5)");
  const Tensor y = random_tensor({2, 3, 4, 8}, 2);
  EXPECT_EQ(error_of([&] { ops::rope_fwd(y, 10000.0f, Tensor::empty({2, 4, 3, 8}, DType::kF32)); }),
            "rope_fwd: out has shape (2, 4, 3, 8) but x has shape (2, 3, 4, 8); expected out of shape (2, 3, 4, 8)");
  EXPECT_EQ(error_of([&] { ops::rope_bwd(y, 10000.0f, Tensor::empty({2, 3, 4, 6}, DType::kF32)); }),
            "rope_bwd: dx has shape (2, 3, 4, 6) but dout has shape (2, 3, 4, 8); expected dx of shape (2, 3, 4, 8)");
  EXPECT_EQ(error_of([&] { ops::rope_fwd(y.reshape({6, 4, 8}), 10000.0f, y.reshape({6, 4, 8})); }),
            "rope_fwd: x must have 4 dims, got shape (6, 4, 8)");
  EXPECT_EQ(error_of([&] { ops::rope_fwd(y, 0.0f, y); }), "rope_fwd: theta must be a positive finite number, got 0");
  EXPECT_EQ(error_of([&] { ops::rope_fwd(y, 10000.0f, Tensor::empty({2, 3, 4, 8}, DType::kI32)); }),
            "rope_fwd: out is i32 but x is f32; they must have the same dtype");
}

}  // namespace
}  // namespace moeforge
