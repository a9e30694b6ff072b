// Tests runtime/ops_attention.cpp and runtime/cpu/attention.cpp: the tiled online-softmax forward
// (out and lse) against a naive double softmax with a causal mask, the backward against central
// finite differences of that reference (small shapes) and against an analytic double backward
// (shapes spanning several tiles), determinism across thread counts, and the argument checks.
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <functional>
#include <ostream>
#include <string>
#include <vector>

#include "runtime/ops.h"
#include "tests/testing.h"

namespace moeforge {
namespace {

using testing::expect_close;
using testing::random_tensor;
using testing::to_double;

struct AttnShape {
  int64_t B, T, H, Hkv, D;
  float amplitude;  // inputs are uniform in [-amplitude, amplitude): larger means peakier softmax
};

std::string shape_name(const AttnShape& s) { return fmt::format("B{}_T{}_H{}_Hkv{}_D{}", s.B, s.T, s.H, s.Hkv, s.D); }
// gtest prints parameters into the test list (and so into ctest's test names); without this it
// prints raw bytes, padding included, which change from build to build.
void PrintTo(const AttnShape& s, std::ostream* os) { *os << shape_name(s) << "_amplitude" << s.amplitude; }

Shape q_shape(const AttnShape& s) { return {s.B, s.T, s.H, s.D}; }
Shape kv_shape(const AttnShape& s) { return {s.B, s.T, s.Hkv, s.D}; }
double scale_of(const AttnShape& s) { return 1.0 / std::sqrt(static_cast<double>(s.D)); }

size_t qi(const AttnShape& s, int64_t b, int64_t t, int64_t h) {
  return static_cast<size_t>(((b * s.T + t) * s.H + h) * s.D);
}
size_t kvi(const AttnShape& s, int64_t b, int64_t t, int64_t g) {
  return static_cast<size_t>(((b * s.T + t) * s.Hkv + g) * s.D);
}

// Causal softmax probabilities of one (b, h, t) row over keys 0..t, from the full row of scores.
std::vector<double> probs_row(const AttnShape& s, const std::vector<double>& q, const std::vector<double>& k, int64_t b,
                              int64_t h, int64_t t, double scale, double* lse) {
  const int64_t g = h / (s.H / s.Hkv);
  std::vector<double> p(static_cast<size_t>(t + 1));
  double mx = -INFINITY;
  for (int64_t u = 0; u <= t; ++u) {
    double dotp = 0.0;
    for (int64_t x = 0; x < s.D; ++x) dotp += q[qi(s, b, t, h) + x] * k[kvi(s, b, u, g) + x];
    p[u] = scale * dotp;
    mx = std::max(mx, p[u]);
  }
  double sum = 0.0;
  for (double& e : p) sum += (e = std::exp(e - mx));
  for (double& e : p) e /= sum;
  if (lse) *lse = mx + std::log(sum);
  return p;
}

// Naive reference forward: out (B, T, H, D), lse (B, H, T).
void ref_forward(const AttnShape& s, const std::vector<double>& q, const std::vector<double>& k,
                 const std::vector<double>& v, double scale, std::vector<double>& out, std::vector<double>& lse) {
  out.assign(q.size(), 0.0);
  lse.assign(static_cast<size_t>(s.B * s.H * s.T), 0.0);
  const int64_t group = s.H / s.Hkv;
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t h = 0; h < s.H; ++h)
      for (int64_t t = 0; t < s.T; ++t) {
        const std::vector<double> p = probs_row(s, q, k, b, h, t, scale, &lse[(b * s.H + h) * s.T + t]);
        for (int64_t u = 0; u <= t; ++u)
          for (int64_t x = 0; x < s.D; ++x) out[qi(s, b, t, h) + x] += p[u] * v[kvi(s, b, u, h / group) + x];
      }
}

// Analytic reference backward, written from the softmax Jacobian: dS_u = P_u (dP_u - sum_w P_w dP_w).
void ref_backward(const AttnShape& s, const std::vector<double>& q, const std::vector<double>& k,
                  const std::vector<double>& v, const std::vector<double>& dout, double scale, std::vector<double>& dq,
                  std::vector<double>& dk, std::vector<double>& dv) {
  dq.assign(q.size(), 0.0);
  dk.assign(k.size(), 0.0);
  dv.assign(v.size(), 0.0);
  const int64_t group = s.H / s.Hkv;
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t h = 0; h < s.H; ++h)
      for (int64_t t = 0; t < s.T; ++t) {
        const int64_t g = h / group;
        const std::vector<double> p = probs_row(s, q, k, b, h, t, scale, nullptr);
        std::vector<double> dp(p.size());
        double pdp = 0.0;
        for (int64_t u = 0; u <= t; ++u) {
          double acc = 0.0;
          for (int64_t x = 0; x < s.D; ++x) acc += dout[qi(s, b, t, h) + x] * v[kvi(s, b, u, g) + x];
          dp[u] = acc;
          pdp += p[u] * acc;
        }
        for (int64_t u = 0; u <= t; ++u) {
          const double dsu = p[u] * (dp[u] - pdp);
          for (int64_t x = 0; x < s.D; ++x) {
            dq[qi(s, b, t, h) + x] += scale * dsu * k[kvi(s, b, u, g) + x];
            dk[kvi(s, b, u, g) + x] += scale * dsu * q[qi(s, b, t, h) + x];
            dv[kvi(s, b, u, g) + x] += p[u] * dout[qi(s, b, t, h) + x];
          }
        }
      }
}

struct Inputs {
  Tensor q, k, v;
};

Inputs make_inputs(const AttnShape& s, uint64_t seed) {
  return {random_tensor(q_shape(s), seed, s.amplitude), random_tensor(kv_shape(s), seed + 1, s.amplitude),
          random_tensor(kv_shape(s), seed + 2)};
}

struct Outputs {
  Tensor out, lse, dq, dk, dv;
};

// Runs our forward and backward with dout = g.
Outputs run_ops(const AttnShape& s, const Inputs& in, const Tensor& g) {
  Outputs r{Tensor::empty(q_shape(s), DType::kF32), Tensor::empty({s.B, s.H, s.T}, DType::kF32),
            Tensor::empty(q_shape(s), DType::kF32), Tensor::empty(kv_shape(s), DType::kF32),
            Tensor::empty(kv_shape(s), DType::kF32)};
  const float scale = static_cast<float>(scale_of(s));
  ops::attention_fwd(in.q, in.k, in.v, scale, r.out, r.lse);
  ops::attention_bwd(in.q, in.k, in.v, r.out, r.lse, g, scale, r.dq, r.dk, r.dv);
  return r;
}

class AttentionTest : public ::testing::TestWithParam<AttnShape> {};

TEST_P(AttentionTest, ForwardMatchesNaiveDouble) {
  const AttnShape s = GetParam();
  const Inputs in = make_inputs(s, 10);
  const Outputs r = run_ops(s, in, random_tensor(q_shape(s), 13));
  std::vector<double> out, lse;
  ref_forward(s, to_double(in.q), to_double(in.k), to_double(in.v), scale_of(s), out, lse);
  expect_close(r.out, out, 1e-5, 1e-5, "out");
  expect_close(r.lse, lse, 1e-6, 1e-5, "lse");
}

TEST_P(AttentionTest, BackwardMatchesAnalyticDouble) {
  const AttnShape s = GetParam();
  const Inputs in = make_inputs(s, 20);
  const Tensor g = random_tensor(q_shape(s), 23);
  const Outputs r = run_ops(s, in, g);
  std::vector<double> dq, dk, dv;
  ref_backward(s, to_double(in.q), to_double(in.k), to_double(in.v), to_double(g), scale_of(s), dq, dk, dv);
  expect_close(r.dq, dq, 1e-5, 1e-5, "dq");
  expect_close(r.dk, dk, 1e-5, 1e-5, "dk");
  expect_close(r.dv, dv, 1e-5, 1e-5, "dv");
}

// T=1; H/Hkv = 1, 2, 4 and H (MQA); T not a multiple of the 64 tile; several tiles; odd D; peaky
// softmax (amplitude 4) so the running max changes between tiles.
INSTANTIATE_TEST_SUITE_P(Shapes, AttentionTest,
                         ::testing::Values(AttnShape{1, 1, 1, 1, 8, 1.0f}, AttnShape{2, 7, 4, 2, 16, 1.0f},
                                           AttnShape{1, 67, 8, 2, 32, 2.0f}, AttnShape{2, 130, 4, 1, 64, 4.0f},
                                           AttnShape{1, 65, 6, 6, 13, 2.0f}, AttnShape{1, 129, 8, 2, 5, 3.0f},
                                           AttnShape{1, 64, 4, 1, 16, 1.0f}),
                         [](const ::testing::TestParamInfo<AttnShape>& p) { return shape_name(p.param); });

// L = sum(out * g); central differences of the double reference against our f32 backward.
void check_against_finite_differences(const AttnShape& s) {
  const Inputs in = make_inputs(s, 30);
  const Tensor g = random_tensor(q_shape(s), 33);
  const Outputs r = run_ops(s, in, g);
  const std::vector<double> q = to_double(in.q), k = to_double(in.k), v = to_double(in.v), gd = to_double(g);
  const double scale = scale_of(s);
  auto loss = [&](const std::vector<double>& qq, const std::vector<double>& kk, const std::vector<double>& vv) {
    std::vector<double> out, lse;
    ref_forward(s, qq, kk, vv, scale, out, lse);
    return testing::dot(out, gd);
  };
  const auto fd_q = testing::finite_diff([&](const std::vector<double>& x) { return loss(x, k, v); }, q);
  const auto fd_k = testing::finite_diff([&](const std::vector<double>& x) { return loss(q, x, v); }, k);
  const auto fd_v = testing::finite_diff([&](const std::vector<double>& x) { return loss(q, k, x); }, v);
  expect_close(r.dq, fd_q, 1e-4, 1e-5, "dq vs finite differences");
  expect_close(r.dk, fd_k, 1e-4, 1e-5, "dk vs finite differences");
  expect_close(r.dv, fd_v, 1e-4, 1e-5, "dv vs finite differences");
}

TEST(AttentionFiniteDiff, SmallGqa) { check_against_finite_differences({2, 9, 4, 2, 5, 2.0f}); }
TEST(AttentionFiniteDiff, SingleStep) { check_against_finite_differences({1, 1, 2, 1, 3, 1.0f}); }
TEST(AttentionFiniteDiff, CrossesTileBoundary) { check_against_finite_differences({1, 70, 2, 1, 4, 2.0f}); }

TEST(Attention, MaskedKeysDoNotLeak) {
  // Changing the keys and values of the last time step must leave every earlier output unchanged.
  const AttnShape s{1, 70, 4, 2, 8, 2.0f};
  Inputs in = make_inputs(s, 40);
  const Outputs r1 = run_ops(s, in, random_tensor(q_shape(s), 41));
  std::vector<float> kf = in.k.to_floats(), vf = in.v.to_floats();
  for (size_t i = static_cast<size_t>(kvi(s, 0, s.T - 1, 0)); i < kf.size(); ++i) {
    kf[i] = 1e3f;
    vf[i] = -1e3f;
  }
  in.k = Tensor::from_floats(kv_shape(s), kf);
  in.v = Tensor::from_floats(kv_shape(s), vf);
  const Outputs r2 = run_ops(s, in, random_tensor(q_shape(s), 41));
  const std::vector<float> o1 = r1.out.to_floats(), o2 = r2.out.to_floats();
  const size_t prefix = qi(s, 0, s.T - 1, 0);
  for (size_t i = 0; i < prefix; ++i) ASSERT_EQ(o1[i], o2[i]) << "element " << i;
}

TEST(Attention, SameBitsForOneAndTwoThreads) {
  const AttnShape s{2, 130, 4, 2, 32, 2.0f};
  const Inputs in = make_inputs(s, 50);
  const Tensor g = random_tensor(q_shape(s), 51);
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  const Outputs r1 = run_ops(s, in, g);
  omp_set_num_threads(2);
  const Outputs r2 = run_ops(s, in, g);
  omp_set_num_threads(saved);
  EXPECT_EQ(r1.out.to_floats(), r2.out.to_floats());
  EXPECT_EQ(r1.lse.to_floats(), r2.lse.to_floats());
  EXPECT_EQ(r1.dq.to_floats(), r2.dq.to_floats());
  EXPECT_EQ(r1.dk.to_floats(), r2.dk.to_floats());
  EXPECT_EQ(r1.dv.to_floats(), r2.dv.to_floats());
}

void expect_error(const std::function<void()>& f, const std::string& message) {
  try {
    f();
    FAIL() << "expected an error: " << message;
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()), message);
  }
}

TEST(Attention, HeadsNotAMultipleOfKvHeads) {
  const Tensor q = random_tensor({1, 4, 6, 8}, 1), k = random_tensor({1, 4, 4, 8}, 2),
               v = random_tensor({1, 4, 4, 8}, 3);
  const Tensor out = Tensor::empty({1, 4, 6, 8}, DType::kF32), lse = Tensor::empty({1, 6, 4}, DType::kF32);
  expect_error([&] { ops::attention_fwd(q, k, v, 0.5f, out, lse); },
               "attention_fwd: q has 6 heads and k has 4 kv heads; grouped-query attention needs H to be a multiple "
               "of Hkv (q (1, 4, 6, 8), k (1, 4, 4, 8))");
}

TEST(Attention, ShapeMismatchesNameOpAndShapes) {
  const Tensor q = random_tensor({2, 5, 4, 8}, 1), k = random_tensor({2, 5, 2, 8}, 2);
  const Tensor out = Tensor::empty({2, 5, 4, 8}, DType::kF32), lse = Tensor::empty({2, 4, 5}, DType::kF32);
  const Tensor v_short = random_tensor({2, 4, 2, 8}, 3);
  expect_error(
      [&] { ops::attention_fwd(q, k, v_short, 0.5f, out, lse); },
      "attention_fwd: v has shape (2, 4, 2, 8) but k has shape (2, 5, 2, 8); expected v of shape (2, 5, 2, 8)");
  const Tensor k_wide = random_tensor({2, 5, 2, 16}, 4);
  expect_error(
      [&] { ops::attention_fwd(q, k_wide, k_wide, 0.5f, out, lse); },
      "attention_fwd: k has shape (2, 5, 2, 16) but q has shape (2, 5, 4, 8); expected k of shape (2, 5, 2, 8)");
  const Tensor lse_bth = Tensor::empty({2, 5, 4}, DType::kF32);
  expect_error([&] { ops::attention_fwd(q, k, k, 0.5f, out, lse_bth); },
               "attention_fwd: lse has shape (2, 5, 4) but q has shape (2, 5, 4, 8); expected lse of shape (2, 4, 5)");
  const Tensor dk_bad = Tensor::empty({2, 5, 4, 8}, DType::kF32);
  const Tensor dq = Tensor::empty({2, 5, 4, 8}, DType::kF32), dv = Tensor::empty({2, 5, 2, 8}, DType::kF32);
  expect_error(
      [&] { ops::attention_bwd(q, k, k, out, lse, out, 0.5f, dq, dk_bad, dv); },
      "attention_bwd: dk has shape (2, 5, 4, 8) but k has shape (2, 5, 2, 8); expected dk of shape (2, 5, 2, 8)");
  const Tensor q3 = random_tensor({2, 5, 32}, 5);
  expect_error([&] { ops::attention_fwd(q3, k, k, 0.5f, out, lse); },
               "attention_fwd: q must have 4 dims, got shape (2, 5, 32)");
}

TEST(Attention, DtypeMismatchNamesOpAndDtype) {
  const Tensor q = random_tensor({1, 3, 2, 4}, 1), k = random_tensor({1, 3, 1, 4}, 2);
  const Tensor out = Tensor::empty({1, 3, 2, 4}, DType::kF32), lse = Tensor::zeros({1, 2, 3}, DType::kI32);
  expect_error([&] { ops::attention_fwd(q, k, k, 0.5f, out, lse); },
               "attention_fwd: lse must be f32, got i32 with shape (1, 2, 3)");
}

}  // namespace
}  // namespace moeforge
