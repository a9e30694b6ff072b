// Tests grouped_gemm_fwd/bwd (runtime/ops_moe.cpp, runtime/cpu/grouped_gemm.cpp): the forward
// against a naive double product per expert (odd sizes, experts without rows, products larger
// than one tile so the tiling and the parallel path are exercised), the backward against the
// analytic double gradient and, on small cases, finite differences of the double forward; dw
// accumulates and dx is written; the checks on offsets and shapes.
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <string>
#include <vector>

#include "runtime/ops.h"
#include "tests/testing.h"

namespace moeforge {
namespace {

using testing::expect_close;
using testing::finite_diff;
using testing::random_tensor;
using testing::to_double;

Tensor i64_tensor(const std::vector<int64_t>& v) {
  Tensor t = Tensor::empty({static_cast<int64_t>(v.size())}, DType::kI64);
  std::copy(v.begin(), v.end(), t.data<int64_t>());
  return t;
}

using testing::error_of;

struct GroupedCase {
  std::vector<int64_t> rows;  // rows per expert; M is their sum
  int64_t cin, cout;
};

std::vector<int64_t> offsets_of(const std::vector<int64_t>& rows) {
  std::vector<int64_t> off{0};
  for (int64_t r : rows) off.push_back(off.back() + r);
  return off;
}

// out rows of expert e = x rows of e · w_eᵀ, in double.
std::vector<double> ref_forward(const std::vector<double>& x, const std::vector<double>& w,
                                const std::vector<int64_t>& off, int64_t cin, int64_t cout) {
  const int64_t m = off.back();
  std::vector<double> out(m * cout, 0.0);
  for (size_t e = 0; e + 1 < off.size(); ++e)
    for (int64_t r = off[e]; r < off[e + 1]; ++r)
      for (int64_t o = 0; o < cout; ++o) {
        double s = 0.0;
        for (int64_t i = 0; i < cin; ++i) s += x[r * cin + i] * w[(e * cout + o) * cin + i];
        out[r * cout + o] = s;
      }
  return out;
}

class GroupedGemmTest : public ::testing::TestWithParam<GroupedCase> {};

TEST_P(GroupedGemmTest, ForwardAndBackwardMatchDouble) {
  const GroupedCase p = GetParam();
  const int64_t e_count = static_cast<int64_t>(p.rows.size());
  const std::vector<int64_t> off = offsets_of(p.rows);
  const int64_t m = off.back();
  const Tensor x = random_tensor({m, p.cin}, 1);
  const Tensor w = random_tensor({e_count, p.cout, p.cin}, 2);
  const Tensor offsets = i64_tensor(off);
  const Tensor out = random_tensor({m, p.cout}, 3);  // must be overwritten
  ops::grouped_gemm_fwd(x, w, offsets, out);
  const std::vector<double> X = to_double(x), W = to_double(w);
  expect_close(out, ref_forward(X, W, off, p.cin, p.cout), 1e-5, 5e-5, "grouped_gemm_fwd");

  const Tensor g = random_tensor({m, p.cout}, 4);
  const Tensor dx = random_tensor({m, p.cin}, 5);  // must be overwritten
  const Tensor dw = random_tensor({e_count, p.cout, p.cin}, 6);
  const std::vector<double> G = to_double(g), dw0 = to_double(dw);
  ops::grouped_gemm_bwd(x, w, offsets, g, dx, dw);

  // Analytic double gradient of L = sum(out * g): dx = g_e · w_e, dw_e = g_eᵀ · x_e.
  std::vector<double> want_dx(m * p.cin, 0.0), want_dw(e_count * p.cout * p.cin, 0.0);
  for (int64_t e = 0; e < e_count; ++e)
    for (int64_t r = off[e]; r < off[e + 1]; ++r)
      for (int64_t o = 0; o < p.cout; ++o)
        for (int64_t i = 0; i < p.cin; ++i) {
          want_dx[r * p.cin + i] += G[r * p.cout + o] * W[(e * p.cout + o) * p.cin + i];
          want_dw[(e * p.cout + o) * p.cin + i] += G[r * p.cout + o] * X[r * p.cin + i];
        }
  if (m * p.cin * p.cout < 5000) {
    const std::vector<double> fd_x = finite_diff(
        [&](const std::vector<double>& xv) { return testing::dot(ref_forward(xv, W, off, p.cin, p.cout), G); }, X);
    const std::vector<double> fd_w = finite_diff(
        [&](const std::vector<double>& wv) { return testing::dot(ref_forward(X, wv, off, p.cin, p.cout), G); }, W);
    expect_close(dx, fd_x, 1e-5, 1e-6, "grouped_gemm_bwd dx vs finite differences");
    std::vector<double> got_dw = to_double(dw);
    for (size_t i = 0; i < got_dw.size(); ++i) got_dw[i] -= dw0[i];
    expect_close(got_dw, fd_w, 1e-5, 1e-6, "grouped_gemm_bwd dw increment vs finite differences");
  }
  for (size_t i = 0; i < want_dw.size(); ++i) want_dw[i] += dw0[i];
  // Elementwise slack for f32 sums of up to ~1000 terms of size ~0.25 (cancelling to small values);
  // the normwise check stays at 1e-5.
  expect_close(dx, want_dx, 1e-5, 5e-5, "grouped_gemm_bwd dx");
  expect_close(dw, want_dw, 1e-5, 5e-5, "grouped_gemm_bwd dw (accumulated)");
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, GroupedGemmTest,
    ::testing::Values(GroupedCase{{5, 0, 9, 3}, 7, 5},        // an expert without rows, odd sizes
                      GroupedCase{{0, 0, 4}, 3, 6},           // leading empty experts
                      GroupedCase{{11}, 4, 3},                // one expert
                      GroupedCase{{1, 2, 1, 3, 0}, 1, 2},     // Cin = 1
                      GroupedCase{{300, 0, 217}, 33, 1030},   // several row and column tiles, parallel
                      GroupedCase{{70, 190, 3, 0, 41}, 1100, 37}));  // dx spans two column tiles

// Tiles depend only on the sizes, so 1 and 3 threads produce bitwise the same numbers.
TEST(GroupedGemm, ResultsDoNotDependOnThreadCount) {
  const std::vector<int64_t> off = offsets_of({300, 0, 517, 90});
  const int64_t m = off.back(), cin = 96, cout = 1100;
  const Tensor x = random_tensor({m, cin}, 1);
  const Tensor w = random_tensor({4, cout, cin}, 2);
  const Tensor g = random_tensor({m, cout}, 3);
  const Tensor offsets = i64_tensor(off);
  std::vector<std::vector<float>> results[2];
  const int saved = omp_get_max_threads();
  for (int pass = 0; pass < 2; ++pass) {
    omp_set_num_threads(pass == 0 ? 1 : 3);
    const Tensor out = Tensor::empty({m, cout}, DType::kF32);
    const Tensor dx = Tensor::empty({m, cin}, DType::kF32);
    const Tensor dw = Tensor::zeros({4, cout, cin}, DType::kF32);
    ops::grouped_gemm_fwd(x, w, offsets, out);
    ops::grouped_gemm_bwd(x, w, offsets, g, dx, dw);
    results[pass] = {out.to_floats(), dx.to_floats(), dw.to_floats()};
  }
  omp_set_num_threads(saved);
  EXPECT_TRUE(results[0][0] == results[1][0]) << "out";
  EXPECT_TRUE(results[0][1] == results[1][1]) << "dx";
  EXPECT_TRUE(results[0][2] == results[1][2]) << "dw";
}

TEST(GroupedGemm, ZeroInnerDimensionGivesZeros) {
  const Tensor x = Tensor::empty({4, 0}, DType::kF32);
  const Tensor w = Tensor::empty({2, 3, 0}, DType::kF32);
  const Tensor offsets = i64_tensor({0, 1, 4});
  const Tensor out = random_tensor({4, 3}, 1);
  ops::grouped_gemm_fwd(x, w, offsets, out);
  expect_close(out, std::vector<double>(12, 0.0), 0.0, 0.0, "out with Cin = 0");
}

TEST(GroupedGemm, OffsetsAreChecked) {
  const Tensor x = random_tensor({23, 7}, 1);
  const Tensor w = random_tensor({4, 5, 7}, 2);
  const Tensor out = Tensor::empty({23, 5}, DType::kF32);
  EXPECT_EQ(error_of([&] { ops::grouped_gemm_fwd(x, w, i64_tensor({1, 5, 5, 14, 23}), out); }),
            "grouped_gemm_fwd: offsets[0] = 1 must be 0");
  EXPECT_EQ(error_of([&] { ops::grouped_gemm_fwd(x, w, i64_tensor({0, 5, 4, 14, 23}), out); }),
            "grouped_gemm_fwd: offsets[2] = 4 is less than offsets[1] = 5; offsets must be non-decreasing");
  EXPECT_EQ(error_of([&] { ops::grouped_gemm_fwd(x, w, i64_tensor({0, 5, 5, 14, 22}), out); }),
            "grouped_gemm_fwd: offsets[4] = 22 must equal M = 23, the rows of x");
  EXPECT_EQ(error_of([&] {
              ops::grouped_gemm_bwd(x, w, i64_tensor({0, 5, 5, 14, 24}), random_tensor({23, 5}, 3),
                                    Tensor::empty({23, 7}, DType::kF32), Tensor::zeros({4, 5, 7}, DType::kF32));
            }),
            "grouped_gemm_bwd: offsets[4] = 24 must equal M = 23, the rows of x");
}

TEST(GroupedGemm, ShapeAndDtypeMessages) {
  const Tensor x = random_tensor({23, 7}, 1);
  const Tensor offsets = i64_tensor({0, 5, 5, 14, 23});
  const Tensor out = Tensor::empty({23, 5}, DType::kF32);
  EXPECT_EQ(error_of([&] { ops::grouped_gemm_fwd(x, random_tensor({4, 5, 6}, 2), offsets, out); }),
            "grouped_gemm_fwd: w has shape (4, 5, 6) but x has shape (23, 7); expected w of shape (4, 5, 7)");
  const Tensor w = random_tensor({4, 5, 7}, 2);
  EXPECT_EQ(error_of([&] { ops::grouped_gemm_fwd(x, w, i64_tensor({0, 5, 23}), out); }),
            "grouped_gemm_fwd: offsets has shape (3) but w has shape (4, 5, 7); expected offsets of shape (5)");
  EXPECT_EQ(error_of([&] { ops::grouped_gemm_fwd(x, w, offsets, Tensor::empty({23, 7}, DType::kF32)); }),
            "grouped_gemm_fwd: out has shape (23, 7) but w has shape (4, 5, 7); expected out of shape (23, 5)");
  EXPECT_EQ(error_of([&] {
              ops::grouped_gemm_fwd(x, w, Tensor::from_ints({5}, std::vector<int32_t>{0, 5, 5, 14, 23}), out);
            }),
            "grouped_gemm_fwd: offsets must be i64, got i32 with shape (5)");
  EXPECT_EQ(error_of([&] {
              ops::grouped_gemm_bwd(x, w, offsets, random_tensor({23, 5}, 3), Tensor::empty({23, 7}, DType::kF32),
                                    Tensor::zeros({4, 7, 5}, DType::kF32));
            }),
            "grouped_gemm_bwd: dw has shape (4, 7, 5) but w has shape (4, 5, 7); expected dw of shape (4, 5, 7)");
}

}  // namespace
}  // namespace moeforge
