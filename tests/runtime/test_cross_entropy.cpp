// Tests cross_entropy_fwd / cross_entropy_bwd (runtime/ops_dense.cpp, runtime/cpu/cross_entropy.cpp):
// losses and lse against a naive double log-softmax (ignored targets, large logits), dlogits
// against finite differences of scale * sum(losses), the in-place path (dlogits aliasing logits)
// against the out-of-place one, and the errors for bad targets, shapes and dtypes.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "runtime/ops.h"
#include "tests/testing.h"

namespace moeforge {
namespace {

using testing::expect_close;
using testing::random_ints;
using testing::random_tensor;
using testing::to_double;

template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

// logits (N, V) -> losses (N), lse (N)
void ref_cross_entropy(const std::vector<double>& logits, const std::vector<int32_t>& targets, int64_t v,
                       std::vector<double>& losses, std::vector<double>& lse) {
  const size_t n = targets.size();
  losses.assign(n, 0.0);
  lse.assign(n, 0.0);
  for (size_t i = 0; i < n; ++i) {
    const double* row = logits.data() + i * v;
    const double m = *std::max_element(row, row + v);
    double s = 0.0;
    for (int64_t j = 0; j < v; ++j) s += std::exp(row[j] - m);
    lse[i] = m + std::log(s);
    if (targets[i] >= 0) losses[i] = lse[i] - row[targets[i]];
  }
}

double ref_total_loss(const std::vector<double>& logits, const std::vector<int32_t>& targets, int64_t v) {
  std::vector<double> losses, lse;
  ref_cross_entropy(logits, targets, v, losses, lse);
  double total = 0.0;
  for (double l : losses) total += l;
  return total;
}

struct CeCase {
  int64_t n, v;
  float logit_scale;
};

std::string case_name(const ::testing::TestParamInfo<CeCase>& test) {
  return fmt::format("N{}_V{}_scale{}", test.param.n, test.param.v, static_cast<int>(test.param.logit_scale));
}

// Random targets in [0, V) with every third row ignored (two different negative values).
Tensor targets_with_ignored(int64_t n, int64_t v, uint64_t seed) {
  Tensor t = random_ints({n}, seed, 0, static_cast<int32_t>(v));
  for (int64_t i = 1; i < n; i += 3) t.data<int32_t>()[i] = i % 2 ? -100 : -1;
  return t;
}

std::vector<int32_t> ints_of(const Tensor& t) {
  const int32_t* p = t.data<int32_t>();
  return {p, p + t.numel()};
}

class CrossEntropyTest : public ::testing::TestWithParam<CeCase> {};

TEST_P(CrossEntropyTest, ForwardMatchesDouble) {
  const CeCase p = GetParam();
  const Tensor logits = random_tensor({p.n, p.v}, 1, p.logit_scale);
  const Tensor targets = targets_with_ignored(p.n, p.v, 2);
  const Tensor losses = random_tensor({p.n}, 3), lse = random_tensor({p.n}, 4);
  ops::cross_entropy_fwd(logits, targets, losses, lse);
  std::vector<double> want_losses, want_lse;
  ref_cross_entropy(to_double(logits), ints_of(targets), p.v, want_losses, want_lse);
  expect_close(losses, want_losses, 1e-5, 1e-5 * p.logit_scale, "cross_entropy_fwd losses");
  expect_close(lse, want_lse, 1e-6, 1e-6, "cross_entropy_fwd lse");
}

TEST_P(CrossEntropyTest, InPlaceBackwardEqualsOutOfPlace) {
  const CeCase p = GetParam();
  const Tensor logits = random_tensor({p.n, p.v}, 8, p.logit_scale);
  const Tensor targets = targets_with_ignored(p.n, p.v, 9);
  const Tensor losses = Tensor::empty({p.n}, DType::kF32), lse = Tensor::empty({p.n}, DType::kF32);
  ops::cross_entropy_fwd(logits, targets, losses, lse);
  const Tensor dlogits = Tensor::empty({p.n, p.v}, DType::kF32);
  ops::cross_entropy_bwd(logits, targets, lse, 1.0f / static_cast<float>(p.n), dlogits);
  const Tensor in_place = logits.clone();
  ops::cross_entropy_bwd(in_place, targets, lse, 1.0f / static_cast<float>(p.n), in_place);
  expect_close(in_place, to_double(dlogits), 0.0, 0.0, "cross_entropy_bwd in place");
}

INSTANTIATE_TEST_SUITE_P(Shapes, CrossEntropyTest,
                         ::testing::Values(CeCase{1, 1, 1.0f}, CeCase{1, 7, 1.0f}, CeCase{5, 13, 3.0f},
                                           CeCase{4, 37, 50.0f}, CeCase{16, 259, 4.0f}, CeCase{33, 1001, 100.0f}),
                         case_name);

// Finite differences cost O((N V)^2): small shapes only.
class CrossEntropyGradTest : public ::testing::TestWithParam<CeCase> {};

TEST_P(CrossEntropyGradTest, BackwardMatchesFiniteDifferences) {
  const CeCase p = GetParam();
  const float scale = 0.37f;
  const Tensor logits = random_tensor({p.n, p.v}, 5, p.logit_scale);
  const Tensor targets = targets_with_ignored(p.n, p.v, 6);
  const std::vector<int32_t> tv = ints_of(targets);
  std::vector<double> fd = testing::finite_diff(
      [&](const std::vector<double>& x) { return ref_total_loss(x, tv, p.v); }, to_double(logits));
  for (double& d : fd) d *= scale;

  const Tensor losses = Tensor::empty({p.n}, DType::kF32), lse = Tensor::empty({p.n}, DType::kF32);
  ops::cross_entropy_fwd(logits, targets, losses, lse);
  const Tensor dlogits = random_tensor({p.n, p.v}, 7);  // written, ignored rows included
  ops::cross_entropy_bwd(logits, targets, lse, scale, dlogits);
  expect_close(dlogits, fd, 1e-4, 1e-6, "cross_entropy_bwd");
}

INSTANTIATE_TEST_SUITE_P(Shapes, CrossEntropyGradTest,
                         ::testing::Values(CeCase{1, 1, 1.0f}, CeCase{1, 7, 1.0f}, CeCase{5, 13, 3.0f},
                                           CeCase{4, 37, 50.0f}, CeCase{7, 67, 4.0f}),
                         case_name);

TEST(CrossEntropy, IgnoredRowsHaveZeroLossAndGradient) {
  const Tensor logits = random_tensor({3, 5}, 1);
  const Tensor targets = Tensor::from_ints({3}, std::vector<int32_t>{-1, 4, -7});
  const Tensor losses = Tensor::empty({3}, DType::kF32), lse = Tensor::empty({3}, DType::kF32);
  ops::cross_entropy_fwd(logits, targets, losses, lse);
  const std::vector<float> l = losses.to_floats();
  EXPECT_EQ(l[0], 0.0f);
  EXPECT_GT(l[1], 0.0f);
  EXPECT_EQ(l[2], 0.0f);
  std::vector<double> want_losses, want_lse;
  ref_cross_entropy(to_double(logits), {-1, 4, -7}, 5, want_losses, want_lse);
  expect_close(lse, want_lse, 1e-6, 1e-6, "lse of ignored rows is still computed");

  const Tensor dlogits = random_tensor({3, 5}, 2);
  ops::cross_entropy_bwd(logits, targets, lse, 1.0f, dlogits);
  const std::vector<float> d = dlogits.to_floats();
  double row1 = 0.0;
  for (int j = 0; j < 5; ++j) {
    EXPECT_EQ(d[j], 0.0f);
    EXPECT_EQ(d[10 + j], 0.0f);
    row1 += d[5 + j];
  }
  EXPECT_NEAR(row1, 0.0, 1e-6);  // softmax - onehot sums to 0
}

TEST(CrossEntropy, OutOfRangeTargetNamesValuePositionAndVocabulary) {
  std::vector<int32_t> values(8, 3);
  values[5] = 300;
  const Tensor targets = Tensor::from_ints({8}, values);
  const Tensor logits = random_tensor({8, 259}, 1);
  const Tensor losses = Tensor::empty({8}, DType::kF32), lse = Tensor::empty({8}, DType::kF32);
  EXPECT_EQ(error_of([&] { ops::cross_entropy_fwd(logits, targets, losses, lse); }),
            "cross_entropy_fwd: target 300 at position 5 is outside the vocabulary [0, 259)");
  EXPECT_EQ(error_of([&] { ops::cross_entropy_bwd(logits, targets, lse, 1.0f, logits); }),
            "cross_entropy_bwd: target 300 at position 5 is outside the vocabulary [0, 259)");
  targets.data<int32_t>()[5] = 259;
  EXPECT_EQ(error_of([&] { ops::cross_entropy_fwd(logits, targets, losses, lse); }),
            "cross_entropy_fwd: target 259 at position 5 is outside the vocabulary [0, 259)");
}

TEST(CrossEntropy, ShapeAndDtypeErrorsNameOpAndShapes) {
  const Tensor logits = random_tensor({4, 7}, 1);
  const Tensor targets = random_ints({4}, 2, 0, 7);
  const Tensor losses = Tensor::empty({4}, DType::kF32), lse = Tensor::empty({4}, DType::kF32);
  EXPECT_EQ(error_of([&] { ops::cross_entropy_fwd(logits, random_ints({3}, 3, 0, 7), losses, lse); }),
            "cross_entropy_fwd: targets has shape (3) but logits has shape (4, 7); expected targets of shape (4)");
  EXPECT_EQ(error_of([&] { ops::cross_entropy_fwd(logits, targets, losses, Tensor::empty({4, 1}, DType::kF32)); }),
            "cross_entropy_fwd: lse has shape (4, 1) but logits has shape (4, 7); expected lse of shape (4)");
  EXPECT_EQ(error_of([&] { ops::cross_entropy_bwd(logits, targets, lse, 1.0f, random_tensor({4, 8}, 4)); }),
            "cross_entropy_bwd: dlogits has shape (4, 8) but logits has shape (4, 7); "
            "expected dlogits of shape (4, 7)");
  EXPECT_EQ(error_of([&] { ops::cross_entropy_fwd(logits, random_tensor({4}, 5), losses, lse); }),
            "cross_entropy_fwd: targets must be i32, got f32 with shape (4)");
  EXPECT_EQ(error_of([&] { ops::cross_entropy_fwd(logits.reshape({28}), targets, losses, lse); }),
            "cross_entropy_fwd: logits must have 2 dims, got shape (28)");
}

}  // namespace
}  // namespace moeforge
