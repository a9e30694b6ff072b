// Tests rmsnorm_fwd / rmsnorm_bwd (runtime/ops_dense.cpp, runtime/cpu/rmsnorm.cpp): out and rstd
// against a naive double RMSNorm, dx (written) and dw (accumulated) against finite differences of
// that reference, bitwise determinism of dw across thread counts, and the argument errors.
#include <gtest/gtest.h>
#include <omp.h>

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

constexpr double kEps = 1e-5;

// x (N, C), w (C) -> out (N, C); rstd (N) when given.
std::vector<double> ref_rmsnorm(const std::vector<double>& x, const std::vector<double>& w, double eps,
                                std::vector<double>* rstd = nullptr) {
  const size_t c = w.size();
  const size_t n = x.size() / c;
  std::vector<double> out(x.size());
  if (rstd) rstd->assign(n, 0.0);
  for (size_t i = 0; i < n; ++i) {
    double ms = 0.0;
    for (size_t j = 0; j < c; ++j) ms += x[i * c + j] * x[i * c + j];
    ms /= static_cast<double>(c);
    const double r = 1.0 / std::sqrt(ms + eps);
    if (rstd) (*rstd)[i] = r;
    for (size_t j = 0; j < c; ++j) out[i * c + j] = x[i * c + j] * r * w[j];
  }
  return out;
}

std::string shape_name(const ::testing::TestParamInfo<Shape>& test) {
  std::string name;
  for (int64_t d : test.param.dims()) {
    if (!name.empty()) name += "x";
    name += std::to_string(d);
  }
  return name;
}

class RmsnormTest : public ::testing::TestWithParam<Shape> {};

TEST_P(RmsnormTest, ForwardMatchesDouble) {
  const Shape shape = GetParam();
  const int64_t c = shape[-1];
  const Tensor x = random_tensor(shape, 1, 2.0f);
  const Tensor w = random_tensor({c}, 2);
  const Tensor out = Tensor::empty(shape, DType::kF32);
  const Tensor rstd = Tensor::empty({x.numel() / c}, DType::kF32);
  ops::rmsnorm_fwd(x, w, static_cast<float>(kEps), out, rstd);
  std::vector<double> want_rstd;
  const std::vector<double> want = ref_rmsnorm(to_double(x), to_double(w), kEps, &want_rstd);
  expect_close(out, want, 1e-5, 1e-6, "rmsnorm_fwd out");
  expect_close(rstd, want_rstd, 1e-6, 0.0, "rmsnorm_fwd rstd");
}

TEST_P(RmsnormTest, BackwardMatchesFiniteDifferences) {
  const Shape shape = GetParam();
  const int64_t c = shape[-1];
  const Tensor x = random_tensor(shape, 3);
  const Tensor w = random_tensor({c}, 4);
  const Tensor g = random_tensor(shape, 5);
  const std::vector<double> xv = to_double(x), wv = to_double(w), gv = to_double(g);

  const std::vector<double> fd_x = testing::finite_diff(
      [&](const std::vector<double>& xp) { return testing::dot(ref_rmsnorm(xp, wv, kEps), gv); }, xv);
  const std::vector<double> fd_w = testing::finite_diff(
      [&](const std::vector<double>& wp) { return testing::dot(ref_rmsnorm(xv, wp, kEps), gv); }, wv);

  const Tensor out = Tensor::empty(shape, DType::kF32);
  const Tensor rstd = Tensor::empty({x.numel() / c}, DType::kF32);
  ops::rmsnorm_fwd(x, w, static_cast<float>(kEps), out, rstd);
  const Tensor dx = random_tensor(shape, 6);  // garbage: dx is written
  const Tensor dw = random_tensor({c}, 7);    // dw accumulates onto this
  std::vector<double> want_dw = to_double(dw);
  for (size_t j = 0; j < want_dw.size(); ++j) want_dw[j] += fd_w[j];
  ops::rmsnorm_bwd(x, w, rstd, g, dx, dw);
  expect_close(dx, fd_x, 1e-4, 1e-5, "rmsnorm_bwd dx");
  expect_close(dw, want_dw, 1e-4, 1e-5, "rmsnorm_bwd dw");
}

INSTANTIATE_TEST_SUITE_P(Shapes, RmsnormTest,
                         ::testing::Values(Shape{1, 1}, Shape{4, 8}, Shape{3, 13}, Shape{1, 37}, Shape{2, 5, 37},
                                           Shape{40, 16}),
                         shape_name);

TEST(Rmsnorm, WeightGradientIsIdenticalForAnyThreadCount) {
  const int64_t n = 1000, c = 96;  // several row blocks, one of them partial
  const Tensor x = random_tensor({n, c}, 1);
  const Tensor w = random_tensor({c}, 2);
  const Tensor g = random_tensor({n, c}, 3);
  const Tensor out = Tensor::empty({n, c}, DType::kF32);
  const Tensor rstd = Tensor::empty({n}, DType::kF32);
  ops::rmsnorm_fwd(x, w, 1e-6f, out, rstd);
  const Tensor dx1 = Tensor::empty({n, c}, DType::kF32), dx4 = Tensor::empty({n, c}, DType::kF32);
  const Tensor dw1 = Tensor::zeros({c}, DType::kF32), dw4 = Tensor::zeros({c}, DType::kF32);
  const int threads = omp_get_max_threads();
  omp_set_num_threads(1);
  ops::rmsnorm_bwd(x, w, rstd, g, dx1, dw1);
  omp_set_num_threads(4);
  ops::rmsnorm_bwd(x, w, rstd, g, dx4, dw4);
  omp_set_num_threads(threads);
  expect_close(dw4, to_double(dw1), 0.0, 0.0, "dw with 4 threads vs 1");
  expect_close(dx4, to_double(dx1), 0.0, 0.0, "dx with 4 threads vs 1");

  // And the large case is still right: dw_j = sum_n g x r.
  const std::vector<double> xv = to_double(x), gv = to_double(g), rv = to_double(rstd);
  std::vector<double> want(c, 0.0);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < c; ++j) want[j] += gv[i * c + j] * xv[i * c + j] * rv[i];
  expect_close(dw1, want, 1e-5, 1e-5, "dw on 1000 rows");
}

TEST(Rmsnorm, ShapeErrorsNameOpAndShapes) {
  const Tensor x = random_tensor({4, 8}, 1);
  const Tensor out = Tensor::empty({4, 8}, DType::kF32);
  const Tensor rstd = Tensor::empty({4}, DType::kF32);
  EXPECT_EQ(error_of([&] { ops::rmsnorm_fwd(x, random_tensor({7}, 2), 1e-5f, out, rstd); }),
            "rmsnorm_fwd: w has shape (7) but x has shape (4, 8); expected w of shape (8)");
  const Tensor w = random_tensor({8}, 2);
  EXPECT_EQ(error_of([&] { ops::rmsnorm_fwd(x, w, 1e-5f, out, Tensor::empty({8}, DType::kF32)); }),
            "rmsnorm_fwd: rstd has shape (8) but x has shape (4, 8); expected rstd of shape (4)");
  const Tensor dw = Tensor::zeros({8}, DType::kF32);
  EXPECT_EQ(error_of([&] { ops::rmsnorm_bwd(x, w, rstd, random_tensor({8, 4}, 3), out, dw); }),
            "rmsnorm_bwd: dout has shape (8, 4) but x has shape (4, 8); expected dout of shape (4, 8)");
  EXPECT_EQ(error_of([&] { ops::rmsnorm_bwd(x, w, rstd, out, out, Tensor::zeros({4}, DType::kF32)); }),
            "rmsnorm_bwd: dw has shape (4) but w has shape (8); expected dw of shape (8)");
}

TEST(Rmsnorm, EpsAndDtypeErrors) {
  const Tensor x = random_tensor({4, 8}, 1);
  const Tensor w = random_tensor({8}, 2);
  const Tensor out = Tensor::empty({4, 8}, DType::kF32);
  EXPECT_EQ(error_of([&] { ops::rmsnorm_fwd(x, w, 0.0f, out, Tensor::empty({4}, DType::kF32)); }),
            "rmsnorm_fwd: eps must be a positive finite number, got 0");
  EXPECT_EQ(error_of([&] { ops::rmsnorm_fwd(x, w, 1e-5f, out, Tensor::empty({4}, DType::kI32)); }),
            "rmsnorm_fwd: rstd must be f32, got i32 with shape (4)");
  EXPECT_EQ(error_of([&] {
              ops::rmsnorm_fwd(Tensor::empty({4, 0}, DType::kF32), Tensor::empty({0}, DType::kF32), 1e-5f,
                               Tensor::empty({4, 0}, DType::kF32), Tensor::empty({4}, DType::kF32));
            }),
            "rmsnorm_fwd: x must have at least 1 dim and a non-empty last dim, got shape (4, 0)");
}

}  // namespace
}  // namespace moeforge
