// Tests the dispatch ops of runtime/ops_moe.cpp and runtime/cpu/moe_dispatch.cpp: moe_plan on a
// hand-checked example and on random routings (contiguous experts, stable (n, k) order), the
// permute / unpermute forwards against naive double gathers, their backwards against finite
// differences of those references (also with dropped copies, expert -1, as capacity mode makes),
// moe_apply_capacity against a naive priority-order count, and the checks on expert ids,
// positions and shapes.
#include <gtest/gtest.h>

#include <string>
#include <tuple>
#include <vector>

#include "runtime/ops.h"
#include "tests/testing.h"

namespace moeforge {
namespace {

using testing::expect_close;
using testing::finite_diff;
using testing::random_ints;
using testing::random_tensor;
using testing::to_double;

std::vector<int32_t> ints_of(const Tensor& t) {
  const int32_t* p = t.data<int32_t>();
  return {p, p + t.numel()};
}

std::vector<int64_t> longs_of(const Tensor& t) {
  const int64_t* p = t.data<int64_t>();
  return {p, p + t.numel()};
}

using testing::error_of;

struct Plan {
  Tensor positions;  // (N, K) i32
  Tensor offsets;    // (E+1) i64
};

Plan make_plan(const Tensor& experts, int num_experts) {
  Plan p{Tensor::empty(experts.shape(), DType::kI32), Tensor::empty({num_experts + 1}, DType::kI64)};
  ops::moe_plan(experts, num_experts, p.positions, p.offsets);
  return p;
}

// ---- plan ------------------------------------------------------------------------------------------

// experts (N=4, K=2), E=4 (expert 3 gets nothing). Copies of each expert in (n, k) order:
//   e0: (0,1) (2,0)   e1: (1,0) (3,1)   e2: (0,0) (1,1) (2,1) (3,0)
TEST(MoePlan, HandCheckedExample) {
  const Tensor experts = Tensor::from_ints({4, 2}, std::vector<int32_t>{2, 0, 1, 2, 0, 2, 2, 1});
  const Plan p = make_plan(experts, 4);
  EXPECT_EQ(longs_of(p.offsets), (std::vector<int64_t>{0, 2, 4, 8, 8}));
  EXPECT_EQ(ints_of(p.positions), (std::vector<int32_t>{4, 0, 2, 5, 1, 6, 7, 3}));
}

TEST(MoePlan, RandomRoutingsAreStableCountingSorts) {
  for (auto [n, k, e] : {std::tuple<int64_t, int64_t, int>{13, 3, 5}, {7, 1, 4}, {301, 4, 8}, {1, 2, 9}, {0, 2, 3}}) {
    const Tensor experts = random_ints({n, k}, static_cast<uint64_t>(n * k + e), 0, e);
    const Plan p = make_plan(experts, e);
    const std::vector<int32_t> ex = ints_of(experts), pos = ints_of(p.positions);
    const std::vector<int64_t> off = longs_of(p.offsets);
    const int64_t m = n * k;
    ASSERT_EQ(off.front(), 0);
    ASSERT_EQ(off.back(), m);
    std::vector<int64_t> count(e, 0), last(e, -1);
    std::vector<int> hit(m, 0);
    for (int64_t i = 0; i < m; ++i) {  // i runs over copies in (n, k) order
      const int32_t id = ex[i];
      ++count[id];
      ASSERT_GE(pos[i], off[id]) << "copy " << i << " left of its expert's rows";
      ASSERT_LT(pos[i], off[id + 1]) << "copy " << i << " right of its expert's rows";
      ASSERT_GT(pos[i], last[id]) << "copy " << i << " out of (n, k) order";
      last[id] = pos[i];
      ++hit[pos[i]];
    }
    for (int j = 0; j < e; ++j) EXPECT_EQ(off[j + 1] - off[j], count[j]) << "expert " << j;
    for (int64_t r = 0; r < m; ++r) EXPECT_EQ(hit[r], 1) << "row " << r;
  }
}

TEST(MoePlan, RejectsOutOfRangeExpertIds) {
  const Tensor positions = Tensor::empty({3, 2}, DType::kI32);
  const Tensor offsets = Tensor::empty({6}, DType::kI64);
  EXPECT_EQ(error_of([&] {
              ops::moe_plan(Tensor::from_ints({3, 2}, std::vector<int32_t>{0, 1, 5, 2, 3, 4}), 5, positions, offsets);
            }),
            "moe_plan: experts[1, 0] = 5 is out of range [0, 5) (or -1 for a dropped copy)");
  EXPECT_EQ(error_of([&] {
              ops::moe_plan(Tensor::from_ints({3, 2}, std::vector<int32_t>{0, 1, 2, 3, 4, -2}), 5, positions, offsets);
            }),
            "moe_plan: experts[2, 1] = -2 is out of range [0, 5) (or -1 for a dropped copy)");
  EXPECT_EQ(error_of([&] {
              ops::moe_plan(Tensor::zeros({3, 2}, DType::kI32), 4, positions, offsets);
            }),
            "moe_plan: offsets has shape (6) but num_experts=4; expected offsets of shape (5)");
  EXPECT_EQ(error_of([&] { ops::moe_plan(Tensor::zeros({3, 2}, DType::kI32), 0, positions, offsets); }),
            "moe_plan: num_experts=0 must be >= 1");
}

// Dropped copies (expert -1) take no row and get position -1; the kept ones keep the stable order.
TEST(MoePlan, DroppedCopiesTakeNoRow) {
  const Tensor experts = Tensor::from_ints({4, 2}, std::vector<int32_t>{2, -1, 1, 2, -1, 2, 2, 1});
  const Plan p = make_plan(experts, 4);
  EXPECT_EQ(longs_of(p.offsets), (std::vector<int64_t>{0, 0, 2, 6, 6}));
  EXPECT_EQ(ints_of(p.positions), (std::vector<int32_t>{2, -1, 0, 3, -1, 4, 5, 1}));
}

// ---- capacity -----------------------------------------------------------------------------------------

// A copy is kept iff fewer than `capacity` copies of its expert precede it in priority order:
// base, then slot by slot, row by row.
TEST(MoeCapacity, KeepsTheFirstCopiesInPriorityOrder) {
  for (auto [n, k, e, cap] : {std::tuple<int64_t, int64_t, int, int64_t>{13, 2, 4, 3}, {50, 1, 3, 10}, {31, 4, 8, 5},
                             {9, 2, 2, 0}, {64, 2, 4, 100}}) {
    const Tensor experts = random_ints({n, k}, static_cast<uint64_t>(n + k + e), 0, e);
    const Tensor base = Tensor::zeros({k, e}, DType::kI64);
    for (int64_t i = 0; i < k * e; ++i) base.data<int64_t>()[i] = (i * 7) % 3;
    const Tensor dispatch = Tensor::empty({n, k}, DType::kI32);
    ops::moe_apply_capacity(experts, cap, base, dispatch);
    const std::vector<int32_t> ex = ints_of(experts), got = ints_of(dispatch);
    int64_t kept = 0;
    for (int64_t j = 0; j < k; ++j)
      for (int64_t r = 0; r < n; ++r) {
        const int32_t id = ex[r * k + j];
        int64_t before = base.data<int64_t>()[j * e + id];
        for (int64_t r2 = 0; r2 < r; ++r2) before += ex[r2 * k + j] == id;
        const int32_t want = before < cap ? id : -1;
        kept += want >= 0;
        ASSERT_EQ(got[r * k + j], want) << "copy (" << r << ", " << j << ") n=" << n << " cap=" << cap;
      }
    if (cap == 0) {
      EXPECT_EQ(kept, 0);
    }
  }
  EXPECT_EQ(error_of([] {
              ops::moe_apply_capacity(Tensor::zeros({3, 2}, DType::kI32), 2, Tensor::zeros({1, 4}, DType::kI64),
                                      Tensor::empty({3, 2}, DType::kI32));
            }),
            "moe_apply_capacity: base has shape (1, 4) but experts has shape (3, 2); expected base of shape (2, E)");
  EXPECT_EQ(error_of([] {
              ops::moe_apply_capacity(Tensor::from_ints({1, 2}, std::vector<int32_t>{0, 4}), 2,
                                      Tensor::zeros({2, 4}, DType::kI64), Tensor::empty({1, 2}, DType::kI32));
            }),
            "moe_apply_capacity: experts[0, 1] = 4 is out of range [0, 4)");
}

// ---- permute / unpermute -----------------------------------------------------------------------------

struct PermuteCase {
  int64_t n, k, c;
  int e;
  bool drop = false;  // mark about a quarter of the copies dropped (expert -1)
};

class PermuteTest : public ::testing::TestWithParam<PermuteCase> {
 protected:
  void SetUp() override {
    const PermuteCase p = GetParam();
    const uint64_t seed = static_cast<uint64_t>(p.n * 7 + p.k * 3 + p.c);
    experts_ = random_ints({p.n, p.k}, seed, 0, p.e);
    if (p.drop) {
      const Tensor coin = random_ints({p.n, p.k}, seed + 1, 0, 4);
      for (int64_t i = 0; i < p.n * p.k; ++i)
        if (coin.data<int32_t>()[i] == 0) experts_.data<int32_t>()[i] = -1;
    }
    plan_ = make_plan(experts_, p.e);
    pos_ = ints_of(plan_.positions);
    m_ = plan_.offsets.data<int64_t>()[p.e];
  }

  // out[pos[n, k]] = x[n]
  std::vector<double> ref_permute(const std::vector<double>& x) const {
    const PermuteCase p = GetParam();
    std::vector<double> out(m_ * p.c);
    for (int64_t n = 0; n < p.n; ++n)
      for (int64_t j = 0; j < p.k; ++j)
        if (pos_[n * p.k + j] >= 0)
          for (int64_t i = 0; i < p.c; ++i) out[pos_[n * p.k + j] * p.c + i] = x[n * p.c + i];
    return out;
  }

  // out[n] = sum_k w[n, k] y[pos[n, k]]
  std::vector<double> ref_unpermute(const std::vector<double>& y, const std::vector<double>& w) const {
    const PermuteCase p = GetParam();
    std::vector<double> out(p.n * p.c, 0.0);
    for (int64_t n = 0; n < p.n; ++n)
      for (int64_t j = 0; j < p.k; ++j)
        if (pos_[n * p.k + j] >= 0)
          for (int64_t i = 0; i < p.c; ++i) out[n * p.c + i] += w[n * p.k + j] * y[pos_[n * p.k + j] * p.c + i];
    return out;
  }

  // Finite differences are affordable only on the small cases; the large ones (parallel path)
  // compare with the analytic double gradient, which the small cases tie to the differences.
  bool small() const { return GetParam().n * GetParam().k * GetParam().c < 2000; }

  Tensor experts_;
  Plan plan_;
  std::vector<int32_t> pos_;
  int64_t m_ = 0;  // kept copies: rows of the expert-grouped buffer
};

TEST_P(PermuteTest, PermuteForwardAndBackward) {
  const PermuteCase p = GetParam();
  const int64_t m = m_;
  const Tensor x = random_tensor({p.n, p.c}, 1);
  const Tensor out = Tensor::empty({m, p.c}, DType::kF32);
  ops::moe_permute_fwd(x, plan_.positions, out);
  const std::vector<double> X = to_double(x);
  expect_close(out, ref_permute(X), 0.0, 0.0, "moe_permute_fwd");

  const Tensor g = random_tensor({m, p.c}, 2);
  const Tensor dx = random_tensor({p.n, p.c}, 3);  // must be overwritten
  ops::moe_permute_bwd(g, plan_.positions, dx);
  const std::vector<double> G = to_double(g);
  std::vector<double> want(p.n * p.c, 0.0);  // analytic: dx[n] = sum_k g[pos[n, k]]
  for (int64_t n = 0; n < p.n; ++n)
    for (int64_t j = 0; j < p.k; ++j)
      if (pos_[n * p.k + j] >= 0)
        for (int64_t i = 0; i < p.c; ++i) want[n * p.c + i] += G[pos_[n * p.k + j] * p.c + i];
  if (small()) {
    const std::vector<double> fd =
        finite_diff([&](const std::vector<double>& xv) { return testing::dot(ref_permute(xv), G); }, X);
    expect_close(want, fd, 1e-7, 1e-9, "analytic permute gradient vs finite differences");
  }
  expect_close(dx, want, 1e-6, 1e-6, "moe_permute_bwd");
}

TEST_P(PermuteTest, UnpermuteForwardAndBackward) {
  const PermuteCase p = GetParam();
  const int64_t m = m_;
  const Tensor y = random_tensor({m, p.c}, 4);
  const Tensor w = random_tensor({p.n, p.k}, 5);
  const Tensor out = Tensor::empty({p.n, p.c}, DType::kF32);
  ops::moe_unpermute_fwd(y, plan_.positions, w, out);
  const std::vector<double> Y = to_double(y), W = to_double(w);
  expect_close(out, ref_unpermute(Y, W), 1e-6, 1e-6, "moe_unpermute_fwd");

  const Tensor g = random_tensor({p.n, p.c}, 6);
  const Tensor dy = random_tensor({m, p.c}, 7);  // must be overwritten
  const Tensor dw = random_tensor({p.n, p.k}, 8);
  ops::moe_unpermute_bwd(y, plan_.positions, w, g, dy, dw);
  const std::vector<double> G = to_double(g);
  std::vector<double> want_dy(m * p.c), want_dw(p.n * p.k, 0.0);
  for (int64_t n = 0; n < p.n; ++n)
    for (int64_t j = 0; j < p.k; ++j) {
      const int64_t row = pos_[n * p.k + j];
      if (row < 0) continue;
      for (int64_t i = 0; i < p.c; ++i) {
        want_dy[row * p.c + i] = W[n * p.k + j] * G[n * p.c + i];
        want_dw[n * p.k + j] += G[n * p.c + i] * Y[row * p.c + i];
      }
    }
  if (small()) {
    const std::vector<double> fd_y =
        finite_diff([&](const std::vector<double>& yv) { return testing::dot(ref_unpermute(yv, W), G); }, Y);
    const std::vector<double> fd_w =
        finite_diff([&](const std::vector<double>& wv) { return testing::dot(ref_unpermute(Y, wv), G); }, W);
    expect_close(want_dy, fd_y, 1e-7, 1e-9, "analytic dy vs finite differences");
    expect_close(want_dw, fd_w, 1e-7, 1e-9, "analytic dweights vs finite differences");
  }
  expect_close(dy, want_dy, 1e-6, 1e-7, "moe_unpermute_bwd dy");
  expect_close(dw, want_dw, 1e-5, 1e-6, "moe_unpermute_bwd dweights");
}

INSTANTIATE_TEST_SUITE_P(Shapes, PermuteTest,
                         ::testing::Values(PermuteCase{13, 2, 7, 4}, PermuteCase{7, 1, 5, 3},
                                           PermuteCase{7, 4, 3, 5}, PermuteCase{1, 3, 9, 2},
                                           PermuteCase{301, 4, 64, 8}, PermuteCase{257, 2, 131, 5},
                                           PermuteCase{13, 2, 7, 4, true}, PermuteCase{7, 4, 3, 5, true},
                                           PermuteCase{301, 4, 64, 8, true}));

// ---- validation -------------------------------------------------------------------------------------

TEST(MoePermuteValidation, ShapeAndDtypeMessages) {
  const Tensor x = random_tensor({13, 7}, 1);
  const Tensor positions = make_plan(random_ints({13, 2}, 2, 0, 4), 4).positions;
  EXPECT_EQ(error_of([&] { ops::moe_permute_fwd(x, positions, Tensor::empty({26, 6}, DType::kF32)); }),
            "moe_permute_fwd: out has shape (26, 6) but positions has shape (13, 2) and x has shape (13, 7); expected "
            "out of shape (M, 7) with M <= 26");
  EXPECT_EQ(error_of([&] { ops::moe_permute_fwd(x, positions, Tensor::empty({13, 7}, DType::kF32)); }),
            "moe_permute_fwd: positions[0, 0] = 18 is out of range [0, 13) (or -1 for a dropped copy)");
  EXPECT_EQ(error_of([&] { ops::moe_permute_fwd(x, positions, Tensor::empty({27, 7}, DType::kF32)); }),
            "moe_permute_fwd: out has shape (27, 7) but positions has shape (13, 2) and x has shape (13, 7); expected "
            "out of shape (M, 7) with M <= 26");
  EXPECT_EQ(error_of([&] { ops::moe_permute_fwd(x, x, Tensor::empty({26, 7}, DType::kF32)); }),
            "moe_permute_fwd: positions must be i32, got f32 with shape (13, 7)");
  EXPECT_EQ(error_of([&] {
              ops::moe_permute_fwd(random_tensor({12, 7}, 3), positions, Tensor::empty({24, 7}, DType::kF32));
            }),
            "moe_permute_fwd: positions has shape (13, 2) but x has shape (12, 7); expected positions of shape (12, 2)");
  EXPECT_EQ(error_of([&] {
              ops::moe_unpermute_fwd(random_tensor({26, 7}, 4), positions, random_tensor({13, 3}, 5),
                                     Tensor::empty({13, 7}, DType::kF32));
            }),
            "moe_unpermute_fwd: weights has shape (13, 3) but positions has shape (13, 2); expected weights of shape "
            "(13, 2)");
  EXPECT_EQ(error_of([&] {
              ops::moe_permute_bwd(random_tensor({26, 7}, 6), positions, Tensor::empty({13, 6}, DType::kF32));
            }),
            "moe_permute_bwd: dx has shape (13, 6) but dout has shape (26, 7); expected dx of shape (13, 7)");
}

TEST(MoePermuteValidation, PositionsMustBeInRangeAndDistinct) {
  const Tensor x = random_tensor({3, 2}, 1);
  const Tensor out = Tensor::empty({6, 2}, DType::kF32);
  EXPECT_EQ(error_of([&] {
              ops::moe_permute_fwd(x, Tensor::from_ints({3, 2}, std::vector<int32_t>{0, 1, 2, 6, 4, 5}), out);
            }),
            "moe_permute_fwd: positions[1, 1] = 6 is out of range [0, 6) (or -1 for a dropped copy)");
  EXPECT_EQ(error_of([&] {
              ops::moe_permute_fwd(x, Tensor::from_ints({3, 2}, std::vector<int32_t>{0, 1, 2, 3, 1, 5}), out);
            }),
            "moe_permute_fwd: positions[2, 0] = 1 repeats an earlier copy's row; positions must be a permutation of "
            "[0, 6)");
  EXPECT_EQ(error_of([&] {
              ops::moe_unpermute_fwd(out, Tensor::from_ints({3, 2}, std::vector<int32_t>{0, -2, 2, 3, 4, 5}),
                                     random_tensor({3, 2}, 2), x);
            }),
            "moe_unpermute_fwd: positions[0, 1] = -2 is out of range [0, 6) (or -1 for a dropped copy)");
  EXPECT_EQ(error_of([&] {
              ops::moe_permute_fwd(x, Tensor::from_ints({3, 2}, std::vector<int32_t>{0, -1, 2, 3, 4, 1}), out);
            }),
            "moe_permute_fwd: positions keep 5 copies but the buffer has 6 rows; they must be equal");
}

}  // namespace
}  // namespace moeforge
