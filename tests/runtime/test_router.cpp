// Tests the router ops of runtime/ops_moe.cpp and runtime/cpu/router.cpp: router_fwd (both
// gatings, with and without the selection bias) against a naive double reference, router_bwd
// against finite differences of that reference (with and without the aux-loss gradient), the
// tie and bias rules of the selection on hand-computed rows, the aux and z losses (value and
// gradient, and split over row blocks with the global counts and token count, as sequence
// parallelism runs them), and the validation messages.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "runtime/ops.h"
#include "tests/testing.h"

namespace moeforge {
namespace {

using ops::Gating;
using testing::expect_close;
using testing::finite_diff;
using testing::random_tensor;
using testing::to_double;
using testing::error_of;

constexpr double kFdStep = 1e-6;

Tensor i64_tensor(const std::vector<int64_t>& v) {
  Tensor t = Tensor::empty({static_cast<int64_t>(v.size())}, DType::kI64);
  std::copy(v.begin(), v.end(), t.data<int64_t>());
  return t;
}

std::vector<int32_t> ints_of(const Tensor& t) {
  const int32_t* p = t.data<int32_t>();
  return {p, p + t.numel()};
}

// One token's routing in double. Returns the smallest gap between consecutive selection scores
// among the top min(k + 1, E): the selection and its order are stable under a logit step well
// below it (scores move by at most ~step / 4 per unit logit step).
struct RowRef {
  std::vector<double> weights;  // (K)
  std::vector<int32_t> experts;  // (K)
  std::vector<double> probs;    // (E)
  double margin;
};

RowRef ref_row(const double* logits, const double* bias, int64_t e_count, Gating gating, int k) {
  std::vector<double> a(e_count);
  if (gating == Gating::kSoftmaxTopK) {
    double mx = logits[0], sum = 0.0;
    for (int64_t e = 0; e < e_count; ++e) mx = std::max(mx, logits[e]);
    for (int64_t e = 0; e < e_count; ++e) sum += a[e] = std::exp(logits[e] - mx);
    for (double& v : a) v /= sum;
  } else {
    for (int64_t e = 0; e < e_count; ++e) a[e] = 1.0 / (1.0 + std::exp(-logits[e]));
  }
  std::vector<double> score(e_count);
  for (int64_t e = 0; e < e_count; ++e) score[e] = a[e] + (bias ? bias[e] : 0.0);
  std::vector<int32_t> order(e_count);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int32_t i, int32_t j) { return score[i] > score[j]; });

  RowRef r;
  r.experts.assign(order.begin(), order.begin() + k);
  double sel = 0.0;
  for (int32_t id : r.experts) sel += a[id];
  for (int32_t id : r.experts) r.weights.push_back(a[id] / sel);
  r.probs = a;
  if (gating == Gating::kSigmoidTopK) {
    const double total = std::accumulate(a.begin(), a.end(), 0.0);
    for (double& v : r.probs) v /= total;
  }
  r.margin = 1e300;
  for (int64_t j = 0; j + 1 < std::min<int64_t>(k + 1, e_count); ++j)
    r.margin = std::min(r.margin, score[order[j]] - score[order[j + 1]]);
  return r;
}

struct RouterCase {
  Gating gating;
  int64_t n, e;
  int k;
  bool bias;
  bool dprobs;
};

class RouterTest : public ::testing::TestWithParam<RouterCase> {};

TEST_P(RouterTest, ForwardMatchesDoubleAndBackwardMatchesFiniteDifferences) {
  const RouterCase c = GetParam();
  const uint64_t seed = static_cast<uint64_t>(c.n * 131 + c.e * 17 + c.k * 3 + c.bias);
  const Tensor logits = random_tensor({c.n, c.e}, seed, 2.0f);
  const Tensor bias = c.bias ? random_tensor({c.e}, seed + 1, 0.3f) : Tensor();
  const Tensor weights = Tensor::empty({c.n, c.k}, DType::kF32);
  const Tensor experts = Tensor::empty({c.n, c.k}, DType::kI32);
  const Tensor probs = Tensor::empty({c.n, c.e}, DType::kF32);
  ops::router_fwd(logits, c.gating, c.k, bias, weights, experts, probs);

  const std::vector<double> L = to_double(logits);
  const std::vector<double> B = c.bias ? to_double(bias) : std::vector<double>();
  const double* bp = c.bias ? B.data() : nullptr;
  std::vector<double> want_w, want_p;
  std::vector<int32_t> want_e;
  std::vector<bool> stable(c.n);
  int64_t stable_rows = 0;
  for (int64_t n = 0; n < c.n; ++n) {
    const RowRef r = ref_row(&L[n * c.e], bp, c.e, c.gating, c.k);
    want_w.insert(want_w.end(), r.weights.begin(), r.weights.end());
    want_e.insert(want_e.end(), r.experts.begin(), r.experts.end());
    want_p.insert(want_p.end(), r.probs.begin(), r.probs.end());
    stable[n] = r.margin > 10 * kFdStep;
    stable_rows += stable[n];
  }
  EXPECT_EQ(ints_of(experts), want_e);
  expect_close(weights, want_w, 1e-5, 1e-6, "router_fwd weights");
  expect_close(probs, want_p, 1e-5, 1e-6, "router_fwd probs");

  // Backward: L = sum(weights * gw) + sum(probs * gp), differenced one row at a time (rows are
  // independent). On the small cases every row's top-k must be stable under the step; on the
  // large ones the rare near-tied rows are skipped.
  if (c.n < 100) {
    ASSERT_EQ(stable_rows, c.n) << "a near-tied row: pick another seed";
  } else {
    ASSERT_GE(stable_rows, c.n * 9 / 10) << "too many near-tied rows for a finite-difference check";
  }
  const Tensor gw = random_tensor({c.n, c.k}, seed + 2);
  const Tensor gp = c.dprobs ? random_tensor({c.n, c.e}, seed + 3) : Tensor();
  const Tensor dlogits = random_tensor({c.n, c.e}, seed + 4);  // must be overwritten
  ops::router_bwd(logits, c.gating, experts, gw, gp, dlogits);
  const std::vector<double> GW = to_double(gw);
  const std::vector<double> GP = c.dprobs ? to_double(gp) : std::vector<double>();
  const std::vector<double> got_all = to_double(dlogits);
  std::vector<double> got, want;
  for (int64_t n = 0; n < c.n; ++n) {
    if (!stable[n]) continue;
    auto loss = [&](const std::vector<double>& row) {
      const RowRef r = ref_row(row.data(), bp, c.e, c.gating, c.k);
      double l = 0.0;
      for (int j = 0; j < c.k; ++j) l += r.weights[j] * GW[n * c.k + j];
      if (c.dprobs)
        for (int64_t e = 0; e < c.e; ++e) l += r.probs[e] * GP[n * c.e + e];
      return l;
    };
    const std::vector<double> row(L.begin() + n * c.e, L.begin() + (n + 1) * c.e);
    const std::vector<double> fd = finite_diff(loss, row, kFdStep);
    want.insert(want.end(), fd.begin(), fd.end());
    got.insert(got.end(), got_all.begin() + n * c.e, got_all.begin() + (n + 1) * c.e);
  }
  if (c.k == 1 && !c.dprobs) {
    // A single selected expert always weighs 1: the true gradient is zero, so compare absolutely.
    EXPECT_LT(testing::max_abs_error(got, want), 1e-6);
    EXPECT_LT(testing::max_abs_error(want, std::vector<double>(want.size(), 0.0)), 1e-9);
  } else {
    expect_close(got, want, 1e-4, 1e-6, "router_bwd dlogits vs finite differences");
  }
}

std::vector<RouterCase> router_cases() {
  std::vector<RouterCase> cases;
  for (Gating g : {Gating::kSoftmaxTopK, Gating::kSigmoidTopK})
    for (bool bias : {false, true})
      for (bool dprobs : {false, true}) {
        cases.push_back({g, 7, 4, 1, bias, dprobs});
        cases.push_back({g, 13, 8, 2, bias, dprobs});
        cases.push_back({g, 7, 5, 4, bias, dprobs});
        cases.push_back({g, 13, 4, 4, bias, dprobs});
      }
  // Large enough for the parallel path (N * E > 2^15).
  cases.push_back({Gating::kSoftmaxTopK, 1031, 64, 6, false, true});
  cases.push_back({Gating::kSigmoidTopK, 1031, 64, 8, true, true});
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Cases, RouterTest, ::testing::ValuesIn(router_cases()),
                         [](const ::testing::TestParamInfo<RouterCase>& param_info) {
                           const RouterCase& c = param_info.param;
                           return std::string(ops::gating_name(c.gating)) + "_N" + std::to_string(c.n) + "_E" +
                                  std::to_string(c.e) + "_K" + std::to_string(c.k) + (c.bias ? "_bias" : "") +
                                  (c.dprobs ? "_dprobs" : "");
                         });

TEST(Router, GatingNames) {
  EXPECT_STREQ(ops::gating_name(Gating::kSoftmaxTopK), "softmax_topk");
  EXPECT_STREQ(ops::gating_name(Gating::kSigmoidTopK), "sigmoid_topk");
}

TEST(Router, TiesGoToTheLowerExpertId) {
  const Tensor logits = Tensor::from_floats({2, 4}, std::vector<float>{0, 0, 0, 0, 0, 1, 1, 0});
  for (Gating g : {Gating::kSoftmaxTopK, Gating::kSigmoidTopK}) {
    const Tensor weights = Tensor::empty({2, 3}, DType::kF32);
    const Tensor experts = Tensor::empty({2, 3}, DType::kI32);
    const Tensor probs = Tensor::empty({2, 4}, DType::kF32);
    ops::router_fwd(logits, g, 3, Tensor(), weights, experts, probs);
    EXPECT_EQ(ints_of(experts), (std::vector<int32_t>{0, 1, 2, 1, 2, 0})) << ops::gating_name(g);
    const double third = 1.0 / 3.0;
    EXPECT_NEAR(weights.data<float>()[0], third, 1e-7);
    EXPECT_NEAR(probs.data<float>()[3], 0.25, 1e-7);
  }
}

// sigmoid, k = 2, logits (2, 1, 0, -1): s = (0.8808, 0.7311, 0.5, 0.2689). A bias of +1 on expert 3
// moves it to the top of the selection, but its weight is still built from s alone.
TEST(Router, BiasChangesSelectionButNotWeights) {
  const Tensor logits = Tensor::from_floats({1, 4}, std::vector<float>{2, 1, 0, -1});
  const Tensor bias = Tensor::from_floats({4}, std::vector<float>{0, 0, 0, 1});
  const double s0 = 1.0 / (1.0 + std::exp(-2.0)), s1 = 1.0 / (1.0 + std::exp(-1.0));
  const double s3 = 1.0 / (1.0 + std::exp(1.0));
  const double s_total = s0 + s1 + 0.5 + s3;
  const Tensor weights = Tensor::empty({1, 2}, DType::kF32);
  const Tensor experts = Tensor::empty({1, 2}, DType::kI32);
  const Tensor probs = Tensor::empty({1, 4}, DType::kF32);

  ops::router_fwd(logits, Gating::kSigmoidTopK, 2, Tensor(), weights, experts, probs);
  EXPECT_EQ(ints_of(experts), (std::vector<int32_t>{0, 1}));
  expect_close(weights, {s0 / (s0 + s1), s1 / (s0 + s1)}, 1e-6, 0, "unbiased weights");

  ops::router_fwd(logits, Gating::kSigmoidTopK, 2, bias, weights, experts, probs);
  EXPECT_EQ(ints_of(experts), (std::vector<int32_t>{3, 0}));
  expect_close(weights, {s3 / (s3 + s0), s0 / (s3 + s0)}, 1e-6, 0, "biased weights");
  expect_close(probs, {s0 / s_total, s1 / s_total, 0.5 / s_total, s3 / s_total}, 1e-6, 0, "probs ignore the bias");

  // softmax: p = softmax(2, 1, 0, -1); with the bias, expert 3 (p3 + 1) leads.
  ops::router_fwd(logits, Gating::kSoftmaxTopK, 2, bias, weights, experts, probs);
  const double z = std::exp(2.0) + std::exp(1.0) + 1.0 + std::exp(-1.0);
  const double p0 = std::exp(2.0) / z, p3 = std::exp(-1.0) / z;
  EXPECT_EQ(ints_of(experts), (std::vector<int32_t>{3, 0}));
  expect_close(weights, {p3 / (p3 + p0), p0 / (p3 + p0)}, 1e-6, 0, "softmax biased weights");
}

// ---- losses ---------------------------------------------------------------------------------------

double ref_aux_loss(const std::vector<double>& probs, const std::vector<int64_t>& counts, int64_t n, int64_t e,
                    int k) {
  double total = 0.0;
  for (int64_t j = 0; j < e; ++j) {
    double mean = 0.0;
    for (int64_t i = 0; i < n; ++i) mean += probs[i * e + j];
    total += static_cast<double>(counts[j]) * mean / static_cast<double>(n);
  }
  return static_cast<double>(e) / static_cast<double>(n * k) * total;
}

TEST(AuxLoss, ValueAndGradientMatchDouble) {
  const int64_t n = 13, e = 5;
  const int k = 2;
  const Tensor probs = random_tensor({n, e}, 21);  // any values: the loss is linear in probs
  const std::vector<int64_t> cv{7, 0, 9, 4, 6};   // sums to N * K = 26
  const Tensor counts = i64_tensor(cv);
  const Tensor loss = Tensor::empty({1}, DType::kF32);
  ops::moe_aux_loss_fwd(probs, counts, k, n, loss);
  const std::vector<double> P = to_double(probs);
  EXPECT_NEAR(loss.data<float>()[0], ref_aux_loss(P, cv, n, e, k), 1e-6);

  const float scale = 0.37f;
  const Tensor dprobs = random_tensor({n, e}, 22);
  ops::moe_aux_loss_bwd(probs, counts, k, n, scale, dprobs);
  std::vector<double> fd = finite_diff([&](const std::vector<double>& p) { return ref_aux_loss(p, cv, n, e, k); }, P);
  for (double& v : fd) v *= scale;
  expect_close(dprobs, fd, 1e-5, 1e-7, "moe_aux_loss_bwd vs finite differences");
}

TEST(AuxLoss, BalancedRouterScoresOne) {
  const int64_t n = 12, e = 4;
  const int k = 2;
  const Tensor probs = Tensor::empty({n, e}, DType::kF32);
  ops::fill(probs, 0.25f);
  const Tensor loss = Tensor::empty({1}, DType::kF32);
  ops::moe_aux_loss_fwd(probs, i64_tensor({6, 6, 6, 6}), k, n, loss);
  EXPECT_NEAR(loss.data<float>()[0], 1.0, 1e-6);
}

double ref_z_loss(const std::vector<double>& logits, int64_t n, int64_t e) {
  double total = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    double s = 0.0;
    for (int64_t j = 0; j < e; ++j) s += std::exp(logits[i * e + j]);
    total += std::log(s) * std::log(s);
  }
  return total / static_cast<double>(n);
}

TEST(ZLoss, ValueAndAccumulatedGradientMatchDouble) {
  for (auto [n, e] : {std::pair<int64_t, int64_t>{7, 5}, {13, 8}, {1031, 64}}) {
    const Tensor logits = random_tensor({n, e}, 31 + n, 3.0f);
    const Tensor loss = Tensor::empty({1}, DType::kF32);
    ops::router_z_loss_fwd(logits, n, loss);
    const std::vector<double> L = to_double(logits);
    const double want = ref_z_loss(L, n, e);
    EXPECT_NEAR(loss.data<float>()[0], want, 1e-5 * want) << "N=" << n;

    const float scale = 0.01f;
    const Tensor dlogits = random_tensor({n, e}, 32 + n);
    std::vector<double> expect = to_double(dlogits);
    ops::router_z_loss_bwd(logits, n, scale, dlogits);
    // Rows are independent: difference each row's term, scaled by 1/N.
    for (int64_t i = 0; i < n; ++i) {
      const std::vector<double> row(L.begin() + i * e, L.begin() + (i + 1) * e);
      const std::vector<double> fd = finite_diff([&](const std::vector<double>& r) { return ref_z_loss(r, 1, e); }, row);
      for (int64_t j = 0; j < e; ++j) expect[i * e + j] += scale * fd[j] / static_cast<double>(n);
    }
    expect_close(dlogits, expect, 1e-5, 1e-7, "router_z_loss_bwd accumulates onto dlogits");
  }
}

// Sequence parallel: the rows are split into blocks (one per rank); every block's part, computed
// with the global counts and token count, sums to the unsplit loss, and every block's gradient
// is its rows of the unsplit gradient.
TEST(RouterLosses, RowBlocksWithGlobalCountsSumToTheUnsplitLosses) {
  const int64_t n = 23, e = 6;
  const int k = 2;
  const Tensor probs = random_tensor({n, e}, 41);
  const Tensor logits = random_tensor({n, e}, 42, 3.0f);
  const Tensor counts = i64_tensor({9, 3, 0, 14, 11, 9});  // sums to N * K = 46
  const float scale = 0.37f;

  const Tensor aux = Tensor::empty({1}, DType::kF32), z = Tensor::empty({1}, DType::kF32);
  ops::moe_aux_loss_fwd(probs, counts, k, n, aux);
  ops::router_z_loss_fwd(logits, n, z);
  const Tensor daux = Tensor::empty({n, e}, DType::kF32);
  ops::moe_aux_loss_bwd(probs, counts, k, n, scale, daux);
  const Tensor dz = random_tensor({n, e}, 43);
  const std::vector<double> dz_before = to_double(dz);
  ops::router_z_loss_bwd(logits, n, scale, dz);

  // Blocks of 8, 8, 7 rows (three ranks), and an empty block (a rank without tokens).
  const std::vector<int64_t> bounds{0, 8, 16, 16, n};
  double aux_sum = 0.0, z_sum = 0.0;
  for (size_t b = 0; b + 1 < bounds.size(); ++b) {
    const int64_t lo = bounds[b], hi = bounds[b + 1];
    const Tensor part = Tensor::empty({1}, DType::kF32);
    ops::moe_aux_loss_fwd(probs.rows(lo, hi), counts, k, n, part);
    aux_sum += part.data<float>()[0];
    ops::router_z_loss_fwd(logits.rows(lo, hi), n, part);
    z_sum += part.data<float>()[0];

    const Tensor daux_block = random_tensor({hi - lo, e}, 44);  // written
    ops::moe_aux_loss_bwd(probs.rows(lo, hi), counts, k, n, scale, daux_block);
    expect_close(daux_block, to_double(daux.rows(lo, hi)), 0.0, 0.0, fmt::format("aux gradient rows [{}, {})", lo, hi));
    const Tensor dz_block = Tensor::from_floats({hi - lo, e}, std::vector<float>(dz_before.begin() + lo * e,
                                                                                 dz_before.begin() + hi * e));
    ops::router_z_loss_bwd(logits.rows(lo, hi), n, scale, dz_block);  // accumulates
    expect_close(dz_block, to_double(dz.rows(lo, hi)), 0.0, 0.0, fmt::format("z gradient rows [{}, {})", lo, hi));
  }
  EXPECT_NEAR(aux_sum, aux.data<float>()[0], 1e-6 * std::abs(aux.data<float>()[0]));
  EXPECT_NEAR(z_sum, z.data<float>()[0], 1e-6 * z.data<float>()[0]);

  // And against the double references: the aux gradient of a block is that of the whole loss.
  std::vector<double> fd = finite_diff(
      [&](const std::vector<double>& p) { return ref_aux_loss(p, {9, 3, 0, 14, 11, 9}, n, e, k); }, to_double(probs));
  for (double& v : fd) v *= scale;
  expect_close(daux, fd, 1e-5, 1e-7, "moe_aux_loss_bwd vs finite differences");
  EXPECT_NEAR(z.data<float>()[0], ref_z_loss(to_double(logits), n, e), 1e-5 * z.data<float>()[0]);
}

TEST(RouterLosses, NoTokensGiveZeroLoss) {
  const Tensor probs = Tensor::empty({0, 4}, DType::kF32);
  const Tensor loss = random_tensor({1}, 1);
  ops::moe_aux_loss_fwd(probs, i64_tensor({0, 0, 0, 0}), 2, 0, loss);
  EXPECT_EQ(loss.data<float>()[0], 0.0f);
  ops::fill(loss, 1.0f);
  ops::router_z_loss_fwd(probs, 0, loss);
  EXPECT_EQ(loss.data<float>()[0], 0.0f);
}

// ---- the router with its losses in one pass --------------------------------------------------------

// router_fwd_with_stats, the losses from its statistics and router_bwd_fused against the op
// sequence they replace: routing and gradients bitwise, the aux loss to f32 rounding (its mass is
// kept in f32), the statistics against double sums.
TEST(FusedRouter, EqualsTheOpSequenceItReplaces) {
  for (const Gating g : {Gating::kSoftmaxTopK, Gating::kSigmoidTopK})
    for (auto [n, e, k] : {std::tuple<int64_t, int64_t, int>{1, 4, 1}, {37, 8, 2}, {300, 64, 8}, {129, 256, 2}}) {
      SCOPED_TRACE(fmt::format("{} N={} E={} k={}", ops::gating_name(g), n, e, k));
      const Tensor logits = random_tensor({n, e}, 51 + n, 3.0f);
      const Tensor bias = g == Gating::kSigmoidTopK ? random_tensor({e}, 52, 0.1f) : Tensor();
      const Tensor w0 = Tensor::empty({n, k}, DType::kF32), x0 = Tensor::empty({n, k}, DType::kI32);
      const Tensor p0 = Tensor::empty({n, e}, DType::kF32);
      ops::router_fwd(logits, g, k, bias, w0, x0, p0);
      const Tensor w1 = random_tensor({n, k}, 53), x1 = Tensor::empty({n, k}, DType::kI32);
      const Tensor p1 = random_tensor({n, e}, 54);
      const ops::RouterStats st = ops::RouterStats::allocate(n, e, Device::cpu());
      ops::fill(st.prob_mass, -1.0f);
      ops::router_fwd_with_stats(logits, g, k, bias, w1, x1, p1, st);
      expect_close(w1, to_double(w0), 0.0, 0.0, "weights");
      EXPECT_EQ(ints_of(x1), ints_of(x0));
      expect_close(p1, to_double(p0), 0.0, 0.0, "probs");

      // Statistics: the mass is the column sum of probs, selected counts the top-k ids, lse the
      // rows' logsumexp (against double).
      const std::vector<double> P = to_double(p0), L = to_double(logits);
      const std::vector<int32_t> ids = ints_of(x0);
      std::vector<double> mass(e, 0.0), lse(n);
      std::vector<int64_t> selected(e, 0);
      for (int64_t i = 0; i < n; ++i) {
        double s = 0.0;
        for (int64_t j = 0; j < e; ++j) {
          mass[j] += P[i * e + j];
          s += std::exp(L[i * e + j]);
        }
        lse[i] = std::log(s);
      }
      for (const int32_t id : ids) ++selected[id];
      expect_close(st.prob_mass, mass, 1e-6, 1e-6, "prob_mass");
      EXPECT_EQ(std::vector<int64_t>(st.selected.data<int64_t>(), st.selected.data<int64_t>() + e), selected);
      expect_close(st.lse, lse, 1e-6, 1e-6, "lse");

      // The losses, as a rank with these rows of a 3n-token batch would compute them.
      const int64_t tokens = 3 * n;
      const Tensor counts = i64_tensor(selected);
      const Tensor a0 = Tensor::empty({1}, DType::kF32), a1 = Tensor::empty({1}, DType::kF32);
      ops::moe_aux_loss_fwd(p0, counts, k, tokens, a0);
      ops::moe_aux_loss_fwd_from_stats(st, counts, k, tokens, a1);
      EXPECT_NEAR(a1.data<float>()[0], a0.data<float>()[0], 1e-6 * a0.data<float>()[0]);
      const Tensor z0 = Tensor::empty({1}, DType::kF32), z1 = Tensor::empty({1}, DType::kF32);
      ops::router_z_loss_fwd(logits, tokens, z0);
      ops::router_z_loss_fwd_from_stats(st, tokens, z1);
      EXPECT_EQ(z1.data<float>()[0], z0.data<float>()[0]);

      // Backward with every combination of the terms: given dprobs, aux, z.
      const Tensor dweights = random_tensor({n, k}, 55);
      const Tensor dprobs_given = random_tensor({n, e}, 56, 0.1f);
      for (int terms = 0; terms < 8; ++terms) {
        const bool with_dprobs = terms & 1, aux = terms & 2, z = terms & 4;
        SCOPED_TRACE(fmt::format("dprobs {} aux {} z {}", with_dprobs, aux, z));
        const float aux_scale = 0.37f, z_scale = 0.011f;
        Tensor dp;  // the sequence's dprobs: the given one plus the aux loss's
        if (aux) {
          dp = Tensor::empty({n, e}, DType::kF32);
          ops::moe_aux_loss_bwd(p0, counts, k, tokens, aux_scale, dp);
          if (with_dprobs) ops::add_(dp, dprobs_given);
        } else if (with_dprobs) {
          dp = dprobs_given;
        }
        const Tensor want = Tensor::empty({n, e}, DType::kF32);
        ops::router_bwd(logits, g, x0, dweights, dp, want);
        if (z) ops::router_z_loss_bwd(logits, tokens, z_scale, want);

        ops::RouterLossGrads losses;
        losses.num_tokens = tokens;
        if (aux) {
          losses.counts = counts;
          losses.k = k;
          losses.aux_scale = aux_scale;
        }
        if (z) {
          losses.lse = st.lse;
          losses.z_scale = z_scale;
        }
        const Tensor got = random_tensor({n, e}, 57);  // written, not accumulated
        ops::router_bwd_fused(logits, g, x0, dweights, with_dprobs ? dprobs_given : Tensor(), losses, got);
        expect_close(got, to_double(want), 0.0, 0.0, "dlogits");
      }
    }
}

// The fused backward's loss terms against finite differences of the double losses (the sequence
// test above ties it to the per-op tests; this one ties it to the loss definitions directly).
TEST(FusedRouter, LossGradientsMatchFiniteDifferences) {
  const int64_t n = 9, e = 6;
  const int k = 2;
  const Tensor logits = random_tensor({n, e}, 61, 2.0f);
  const Tensor weights = Tensor::empty({n, k}, DType::kF32), experts = Tensor::empty({n, k}, DType::kI32);
  const ops::RouterStats st = ops::RouterStats::allocate(n, e, Device::cpu());
  ops::router_fwd_with_stats(logits, Gating::kSoftmaxTopK, k, Tensor(), weights, experts,
                             Tensor::empty({n, e}, DType::kF32), st);
  const std::vector<int64_t> cv(st.selected.data<int64_t>(), st.selected.data<int64_t>() + e);
  ops::RouterLossGrads losses;
  losses.num_tokens = n;
  losses.counts = i64_tensor(cv);
  losses.k = k;
  losses.aux_scale = 0.5f;
  losses.lse = st.lse;
  losses.z_scale = 0.25f;
  const Tensor dlogits = Tensor::empty({n, e}, DType::kF32);
  ops::router_bwd_fused(logits, Gating::kSoftmaxTopK, experts, Tensor::zeros({n, k}, DType::kF32), Tensor(), losses,
                        dlogits);
  // 0.5 * aux(softmax(logits)) + 0.25 * z(logits), counts held fixed.
  const auto f = [&](const std::vector<double>& l) {
    std::vector<double> p(l.size());
    for (int64_t i = 0; i < n; ++i) {
      double mx = l[i * e], s = 0.0;
      for (int64_t j = 1; j < e; ++j) mx = std::max(mx, l[i * e + j]);
      for (int64_t j = 0; j < e; ++j) s += std::exp(l[i * e + j] - mx);
      for (int64_t j = 0; j < e; ++j) p[i * e + j] = std::exp(l[i * e + j] - mx) / s;
    }
    return 0.5 * ref_aux_loss(p, cv, n, e, k) + 0.25 * ref_z_loss(l, n, e);
  };
  expect_close(dlogits, finite_diff(f, to_double(logits)), 1e-4, 1e-6, "router_bwd_fused vs finite differences");
}

TEST(FusedRouterValidation, MessagesNameOpAndArgument) {
  const int64_t n = 7, e = 4;
  const Tensor logits = random_tensor({n, e}, 1);
  const Tensor weights = Tensor::empty({n, 2}, DType::kF32), experts = Tensor::empty({n, 2}, DType::kI32);
  const Tensor probs = Tensor::empty({n, e}, DType::kF32);
  const ops::RouterStats st = ops::RouterStats::allocate(n, e, Device::cpu());
  EXPECT_EQ(error_of([&] {
              ops::router_fwd_with_stats(logits, Gating::kSoftmaxTopK, 2, Tensor(), weights, experts, probs,
                                         ops::RouterStats::allocate(n, 5, Device::cpu()));
            }),
            "router_fwd_with_stats: stats.prob_mass has shape (5) but logits has shape (7, 4); expected "
            "stats.prob_mass of shape (4)");
  EXPECT_EQ(error_of([&] {
              ops::router_fwd_with_stats(logits, Gating::kSoftmaxTopK, 2, Tensor(), weights, experts, probs,
                                         ops::RouterStats{});
            }),
            "router_fwd_with_stats: stats has undefined tensors; expected RouterStats::allocate(7, 4, ...)");
  EXPECT_EQ(error_of([&] {
              ops::router_fwd_with_stats(logits, Gating::kSoftmaxTopK, 5, Tensor(), weights, experts, probs, st);
            }),
            "router_fwd_with_stats: k=5 must be in [1, E=4]");
  ops::router_fwd_with_stats(logits, Gating::kSoftmaxTopK, 2, Tensor(), weights, experts, probs, st);
  const Tensor loss = Tensor::empty({1}, DType::kF32);
  EXPECT_EQ(error_of([&] { ops::moe_aux_loss_fwd_from_stats(st, i64_tensor({1, 2, 3}), 2, n, loss); }),
            "moe_aux_loss_fwd_from_stats: counts has shape (3) but stats.prob_mass has shape (4); expected counts of "
            "shape (4)");
  EXPECT_EQ(error_of([&] { ops::moe_aux_loss_fwd_from_stats(st, i64_tensor({1, 2, 3, 4}), 2, n - 1, loss); }),
            "moe_aux_loss_fwd_from_stats: num_tokens=6 must be >= the 7 rows the statistics cover");
  EXPECT_EQ(error_of([&] { ops::router_z_loss_fwd_from_stats(st, n, probs); }),
            "router_z_loss_fwd_from_stats: loss has shape (7, 4) but stats.lse has shape (7); expected loss of shape "
            "(1)");
  ops::RouterLossGrads losses;
  losses.num_tokens = n;
  losses.lse = Tensor::empty({n + 1}, DType::kF32);
  const Tensor dlogits = Tensor::empty({n, e}, DType::kF32);
  EXPECT_EQ(error_of([&] {
              ops::router_bwd_fused(logits, Gating::kSoftmaxTopK, experts, weights, Tensor(), losses, dlogits);
            }),
            "router_bwd_fused: losses.lse has shape (8) but logits has shape (7, 4); expected losses.lse of shape (7)");
  losses.lse = st.lse;
  losses.counts = i64_tensor({1, 2, 3, 4});
  losses.k = 9;
  EXPECT_EQ(error_of([&] {
              ops::router_bwd_fused(logits, Gating::kSoftmaxTopK, experts, weights, Tensor(), losses, dlogits);
            }),
            "router_bwd_fused: losses.k=9 must be in [1, E=4]");
  losses.k = 2;
  losses.num_tokens = 3;
  EXPECT_EQ(error_of([&] {
              ops::router_bwd_fused(logits, Gating::kSoftmaxTopK, experts, weights, Tensor(), losses, dlogits);
            }),
            "router_bwd_fused: num_tokens=3 must be >= the 7 rows the statistics cover");
  EXPECT_EQ(error_of([&] {
              ops::router_bwd_fused(logits, Gating::kSoftmaxTopK, experts, weights.reshape({2, 7}), Tensor(), losses,
                                    dlogits);
            }),
            "router_bwd_fused: dweights has shape (2, 7) but experts has shape (7, 2); expected dweights of shape "
            "(7, 2)");
}

// ---- validation -----------------------------------------------------------------------------------

TEST(RouterValidation, MessagesNameOpAndShapes) {
  const Tensor logits = random_tensor({7, 4}, 1);
  const Tensor weights = Tensor::empty({7, 2}, DType::kF32);
  const Tensor experts = Tensor::empty({7, 2}, DType::kI32);
  const Tensor probs = Tensor::empty({7, 4}, DType::kF32);
  EXPECT_EQ(error_of([&] { ops::router_fwd(logits, Gating::kSoftmaxTopK, 5, Tensor(), weights, experts, probs); }),
            "router_fwd: k=5 must be in [1, E=4]");
  EXPECT_EQ(error_of([&] { ops::router_fwd(logits, Gating::kSoftmaxTopK, 0, Tensor(), weights, experts, probs); }),
            "router_fwd: k=0 must be in [1, E=4]");
  EXPECT_EQ(error_of([&] { ops::router_fwd(logits, Gating::kSoftmaxTopK, 3, Tensor(), weights, experts, probs); }),
            "router_fwd: weights has shape (7, 2) but logits has shape (7, 4); expected weights of shape (7, 3)");
  EXPECT_EQ(error_of([&] {
              ops::router_fwd(logits, Gating::kSigmoidTopK, 2, random_tensor({5}, 2), weights, experts, probs);
            }),
            "router_fwd: bias has shape (5) but logits has shape (7, 4); expected bias of shape (4)");
  EXPECT_EQ(error_of([&] { ops::router_fwd(logits, Gating::kSoftmaxTopK, 2, Tensor(), weights, weights, probs); }),
            "router_fwd: experts must be i32, got f32 with shape (7, 2)");

  ops::router_fwd(logits, Gating::kSoftmaxTopK, 2, Tensor(), weights, experts, probs);
  const Tensor dlogits = Tensor::empty({7, 4}, DType::kF32);
  EXPECT_EQ(error_of([&] {
              ops::router_bwd(logits, Gating::kSoftmaxTopK, experts, weights, random_tensor({7, 5}, 3), dlogits);
            }),
            "router_bwd: dprobs has shape (7, 5) but logits has shape (7, 4); expected dprobs of shape (7, 4)");
  EXPECT_EQ(error_of([&] {
              ops::router_bwd(logits, Gating::kSoftmaxTopK, experts, weights.reshape({2, 7}), Tensor(), dlogits);
            }),
            "router_bwd: dweights has shape (2, 7) but experts has shape (7, 2); expected dweights of shape (7, 2)");
  experts.data<int32_t>()[5] = 4;
  EXPECT_EQ(error_of([&] { ops::router_bwd(logits, Gating::kSoftmaxTopK, experts, weights, Tensor(), dlogits); }),
            "router_bwd: experts[2, 1] = 4 is out of range [0, 4)");

  const Tensor loss = Tensor::empty({1}, DType::kF32);
  EXPECT_EQ(error_of([&] { ops::moe_aux_loss_fwd(probs, i64_tensor({1, 2, 3}), 2, 7, loss); }),
            "moe_aux_loss_fwd: counts has shape (3) but probs has shape (7, 4); expected counts of shape (4)");
  EXPECT_EQ(error_of([&] { ops::moe_aux_loss_fwd(probs, experts, 2, 7, loss); }),
            "moe_aux_loss_fwd: counts must be i64, got i32 with shape (7, 2)");
  EXPECT_EQ(error_of([&] { ops::router_z_loss_fwd(logits, 7, probs); }),
            "router_z_loss_fwd: loss has shape (7, 4) but logits has shape (7, 4); expected loss of shape (1)");
  EXPECT_EQ(error_of([&] { ops::moe_aux_loss_fwd(probs, i64_tensor({1, 2, 3, 4}), 2, 6, loss); }),
            "moe_aux_loss_fwd: num_tokens=6 must be >= the 7 rows of probs (shape (7, 4))");
  EXPECT_EQ(error_of([&] { ops::moe_aux_loss_bwd(probs, i64_tensor({1, 2, 3, 4}), 2, 0, 1.0f, dlogits); }),
            "moe_aux_loss_bwd: num_tokens=0 must be >= the 7 rows of probs (shape (7, 4))");
  EXPECT_EQ(error_of([&] { ops::router_z_loss_fwd(logits, 3, loss); }),
            "router_z_loss_fwd: num_tokens=3 must be >= the 7 rows of logits (shape (7, 4))");
  EXPECT_EQ(error_of([&] { ops::router_z_loss_bwd(logits, -1, 1.0f, dlogits); }),
            "router_z_loss_bwd: num_tokens=-1 must be >= the 7 rows of logits (shape (7, 4))");
  EXPECT_EQ(error_of([&] { ops::router_z_loss_fwd(Tensor::empty({0, 4}, DType::kF32), -1, loss); }),
            "router_z_loss_fwd: num_tokens=-1 must be >= the 0 rows of logits (shape (0, 4))");
}

}  // namespace
}  // namespace moeforge
