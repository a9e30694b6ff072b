// Tests runtime/ops_elementwise.cpp and runtime/cpu/elementwise.cpp: GEMM in all transpose
// combinations against a naive double product, the accumulate flag, and the elementwise ops.
#include <gtest/gtest.h>

#include <sstream>

#include "runtime/ops.h"
#include "tests/testing.h"

namespace moeforge {
namespace {

using testing::expect_close;
using testing::random_tensor;
using testing::to_double;

struct GemmCase {
  int64_t m, n, k;
  bool ta, tb, acc;
  float alpha;
};

void PrintTo(const GemmCase& c, std::ostream* os) {
  *os << "m" << c.m << "_n" << c.n << "_k" << c.k << (c.ta ? "_ta" : "") << (c.tb ? "_tb" : "") << (c.acc ? "_acc" : "");
}

class GemmTest : public ::testing::TestWithParam<GemmCase> {};

TEST_P(GemmTest, MatchesNaiveDouble) {
  const GemmCase p = GetParam();
  const Tensor a = random_tensor(p.ta ? Shape{p.k, p.m} : Shape{p.m, p.k}, 1);
  const Tensor b = random_tensor(p.tb ? Shape{p.n, p.k} : Shape{p.k, p.n}, 2);
  const Tensor c = random_tensor({p.m, p.n}, 3);
  const std::vector<double> A = to_double(a), B = to_double(b), C0 = to_double(c);
  std::vector<double> want(static_cast<size_t>(p.m * p.n));
  for (int64_t i = 0; i < p.m; ++i)
    for (int64_t j = 0; j < p.n; ++j) {
      double s = 0.0;
      for (int64_t l = 0; l < p.k; ++l) {
        const double av = p.ta ? A[l * p.m + i] : A[i * p.k + l];
        const double bv = p.tb ? B[j * p.k + l] : B[l * p.n + j];
        s += av * bv;
      }
      want[i * p.n + j] = p.alpha * s + (p.acc ? C0[i * p.n + j] : 0.0);
    }
  ops::gemm(a, p.ta, b, p.tb, c, p.acc, p.alpha);
  expect_close(c, want, 1e-5, 1e-5, "gemm");
}

INSTANTIATE_TEST_SUITE_P(Shapes, GemmTest,
                         ::testing::Values(GemmCase{7, 5, 3, false, false, false, 1.0f},
                                           GemmCase{7, 5, 3, true, false, false, 1.0f},
                                           GemmCase{7, 5, 3, false, true, false, 1.0f},
                                           GemmCase{7, 5, 3, true, true, false, 1.0f},
                                           GemmCase{33, 17, 65, false, true, true, 1.0f},
                                           GemmCase{33, 17, 65, true, false, true, 0.5f},
                                           GemmCase{1, 1, 1, true, true, true, -2.0f},
                                           GemmCase{64, 128, 96, false, false, true, 1.0f}),
                         [](const ::testing::TestParamInfo<GemmCase>& p) {
                           std::ostringstream os;
                           PrintTo(p.param, &os);
                           return os.str();
                         });

TEST(Gemm, LeadingDimsFormRows) {
  const Tensor a = random_tensor({2, 3, 4}, 4);  // 6 x 4 matrix
  const Tensor b = random_tensor({5, 4}, 5);
  const Tensor c = Tensor::empty({2, 3, 5}, DType::kF32);
  const Tensor c2 = Tensor::empty({6, 5}, DType::kF32);
  ops::gemm(a, false, b, true, c);
  ops::gemm(a.reshape({6, 4}), false, b, true, c2);
  expect_close(c, to_double(c2), 0.0, 0.0, "gemm on a 3-D operand");
}

TEST(Gemm, ZeroInnerDimensionClearsOrKeeps) {
  const Tensor a = Tensor::empty({3, 0}, DType::kF32);
  const Tensor b = Tensor::empty({0, 2}, DType::kF32);
  const Tensor c = random_tensor({3, 2}, 6);
  const std::vector<double> before = to_double(c);
  ops::gemm(a, false, b, false, c, /*accumulate=*/true);
  expect_close(c, before, 0.0, 0.0, "accumulate with K=0 keeps c");
  ops::gemm(a, false, b, false, c, /*accumulate=*/false);
  expect_close(c, std::vector<double>(6, 0.0), 0.0, 0.0, "K=0 clears c");
}

TEST(Gemm, ShapeMismatchNamesOpAndShapes) {
  const Tensor a = random_tensor({4, 3}, 1);
  const Tensor b = random_tensor({5, 2}, 2);
  const Tensor c = Tensor::empty({4, 2}, DType::kF32);
  try {
    ops::gemm(a, false, b, false, c);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("gemm"), std::string::npos) << msg;
    EXPECT_NE(msg.find("(4, 3)"), std::string::npos) << msg;
    EXPECT_NE(msg.find("(5, 2)"), std::string::npos) << msg;
  }
}

TEST(Gemm, DtypeMismatchNamesOpAndDtype) {
  const Tensor a = Tensor::zeros({4, 3}, DType::kI32);
  const Tensor b = random_tensor({3, 2}, 2);
  const Tensor c = Tensor::empty({4, 2}, DType::kF32);
  try {
    ops::gemm(a, false, b, false, c);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(), "gemm: a must be f32 or bf16, got i32 with shape (4, 3)");
  }
}

TEST(Elementwise, AddScaleFillSumSquares) {
  const Tensor a = random_tensor({3, 7}, 1);
  const Tensor b = random_tensor({3, 7}, 2);
  const Tensor out = Tensor::empty({3, 7}, DType::kF32);
  ops::add(a, b, out);
  std::vector<double> want = to_double(a);
  const std::vector<double> bv = to_double(b);
  for (size_t i = 0; i < want.size(); ++i) want[i] += bv[i];
  expect_close(out, want, 1e-7, 1e-7, "add");

  ops::add_(out, b, -2.0f);
  for (size_t i = 0; i < want.size(); ++i) want[i] -= 2.0 * bv[i];
  expect_close(out, want, 1e-6, 1e-6, "add_");

  ops::scale_(out, 0.5f);
  double ss = 0.0;
  for (double& w : want) {
    w *= 0.5;
    ss += w * w;
  }
  expect_close(out, want, 1e-6, 1e-6, "scale_");
  EXPECT_NEAR(ops::sum_squares(out), ss, 1e-5 * ss);

  ops::fill(out, 3.0f);
  expect_close(out, std::vector<double>(21, 3.0), 0.0, 0.0, "fill");

  const Tensor copy = Tensor::empty({3, 7}, DType::kF32);
  ops::copy(a, copy);
  expect_close(copy, to_double(a), 0.0, 0.0, "copy");
}

TEST(Elementwise, AddShapeMismatchNamesBothShapes) {
  const Tensor a = random_tensor({3, 7}, 1);
  const Tensor b = random_tensor({7, 3}, 2);
  try {
    ops::add_(a, b);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(), "add_: src has shape (7, 3) but dst has shape (3, 7); expected src of shape (3, 7)");
  }
}

}  // namespace
}  // namespace moeforge
