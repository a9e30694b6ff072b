// Tests optim/adamw.cpp: a two-step example computed by hand in double (with and without weight
// decay, and a norm weight exempt from it), 3 steps against torch.optim.AdamW
// (tests/reference/adamw_reference.py), the step count and resume through the state accessors,
// and the error messages.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <vector>

#include "optim/adamw.h"
#include "runtime/ops.h"
#include "tests/data/temp_dir.h"
#include "tests/testing.h"

namespace moeforge {
namespace {

using testing::error_of;

Param& add_param(ParamRegistry& reg, const std::string& name, Shape shape, bool decay) {
  return reg.add(ParamSpec{.name = name, .global_shape = shape, .weight_decay = decay});
}

void set_values(const Tensor& t, const std::vector<float>& values) {
  ASSERT_EQ(t.numel(), static_cast<int64_t>(values.size()));
  for (size_t i = 0; i < values.size(); ++i) t.data<float>()[i] = values[i];
}

// AdamW on one element in double, written from the paper's Algorithm 2 with torch's placement of
// eps (after the bias-corrected square root) and of the decay (on the weights before the update).
struct RefAdamW {
  double beta1, beta2, eps, wd;
  double p, m = 0.0, v = 0.0;
  void step(double g, double lr, int t, bool decay) {
    if (decay) p *= 1.0 - lr * wd;
    m = beta1 * m + (1.0 - beta1) * g;
    v = beta2 * v + (1.0 - beta2) * g * g;
    const double m_hat = m / (1.0 - std::pow(beta1, t));
    const double v_hat = v / (1.0 - std::pow(beta2, t));
    p -= lr * m_hat / (std::sqrt(v_hat) + eps);
  }
};

void expect_rel(double got, double want, double rtol, const std::string& what) {
  EXPECT_LE(std::abs(got - want), rtol * std::abs(want)) << what << ": got " << got << ", want " << want;
}

// Scalar parameters: "w" and "u" decay, "norm" is exempt. "u" gets a zero gradient on the first
// step, so that step is the decay alone.
class AdamWTwoSteps : public ::testing::TestWithParam<float> {};

TEST_P(AdamWTwoSteps, MatchesHandComputation) {
  const float wd = GetParam();
  const AdamWOptions opt{.beta1 = 0.9f, .beta2 = 0.95f, .eps = 1e-8f, .weight_decay = wd};
  ParamRegistry reg;
  Param& w = add_param(reg, "w", {1}, true);
  Param& u = add_param(reg, "u", {1}, true);
  Param& norm = add_param(reg, "norm", {1}, false);
  set_values(w.value, {0.5f});
  set_values(u.value, {-2.0f});
  set_values(norm.value, {1.0f});
  AdamW adamw(reg, opt);

  const float lr1 = 0.01f, lr2 = 0.005f;
  set_values(w.grad, {0.2f});
  set_values(u.grad, {0.0f});
  set_values(norm.grad, {-0.3f});
  adamw.step(lr1);
  EXPECT_EQ(adamw.steps(), 1);

  // Step 1 by hand: m_hat = g and v_hat = g^2, so the update is lr * g / (|g| + eps).
  const double b1 = opt.beta1, b2 = opt.beta2, eps = opt.eps, l1 = lr1, l2 = lr2, d = wd;
  const double gw1 = 0.2f, gn1 = -0.3f;
  const double w1 = 0.5 * (1.0 - l1 * d) - l1 * gw1 / (std::abs(gw1) + eps);
  const double u1 = -2.0 * (1.0 - l1 * d);
  const double n1 = 1.0 - l1 * gn1 / (std::abs(gn1) + eps);
  expect_rel(w.value.data<float>()[0], w1, 1e-6, "w after step 1");
  expect_rel(u.value.data<float>()[0], u1, 1e-6, "u after step 1");
  expect_rel(norm.value.data<float>()[0], n1, 1e-6, "norm after step 1");
  expect_rel(adamw.exp_avg("w").data<float>()[0], (1.0 - b1) * gw1, 1e-6, "exp_avg(w) after step 1");
  expect_rel(adamw.exp_avg_sq("w").data<float>()[0], (1.0 - b2) * gw1 * gw1, 1e-6, "exp_avg_sq(w) after step 1");
  EXPECT_EQ(adamw.exp_avg("u").data<float>()[0], 0.0f);
  EXPECT_EQ(adamw.exp_avg_sq("u").data<float>()[0], 0.0f);

  set_values(w.grad, {-0.1f});
  set_values(u.grad, {0.05f});
  set_values(norm.grad, {0.4f});
  adamw.step(lr2);
  EXPECT_EQ(adamw.steps(), 2);

  // Step 2 by hand: bias corrections 1 - beta^2.
  const auto step2 = [&](double p1, double g1, double g2, bool decay) {
    const double m = b1 * (1.0 - b1) * g1 + (1.0 - b1) * g2;
    const double v = b2 * (1.0 - b2) * g1 * g1 + (1.0 - b2) * g2 * g2;
    const double decayed = decay ? p1 * (1.0 - l2 * d) : p1;
    return decayed - l2 / (1.0 - b1 * b1) * m / (std::sqrt(v) / std::sqrt(1.0 - b2 * b2) + eps);
  };
  expect_rel(w.value.data<float>()[0], step2(w1, gw1, double(-0.1f), true), 1e-6, "w after step 2");
  expect_rel(u.value.data<float>()[0], step2(u1, 0.0, double(0.05f), true), 1e-6, "u after step 2");
  expect_rel(norm.value.data<float>()[0], step2(n1, gn1, double(0.4f), false), 1e-6, "norm after step 2");
  expect_rel(adamw.exp_avg("norm").data<float>()[0], b1 * (1.0 - b1) * gn1 + (1.0 - b1) * double(0.4f), 1e-6,
             "exp_avg(norm) after step 2");
  expect_rel(adamw.exp_avg_sq("norm").data<float>()[0],
             b2 * (1.0 - b2) * gn1 * gn1 + (1.0 - b2) * double(0.4f) * double(0.4f), 1e-6,
             "exp_avg_sq(norm) after step 2");
}

INSTANTIATE_TEST_SUITE_P(WeightDecay, AdamWTwoSteps, ::testing::Values(0.1f, 0.0f));

TEST(AdamW, NormWeightIsBitwiseIndependentOfWeightDecay) {
  std::vector<float> results;
  for (float wd : {0.0f, 0.3f}) {
    ParamRegistry reg;
    Param& n = add_param(reg, "norm", {5}, false);
    ops::copy(testing::random_tensor({5}, 1), n.value);
    AdamW adamw(reg, {.weight_decay = wd});
    for (int s = 0; s < 3; ++s) {
      ops::copy(testing::random_tensor({5}, 10 + s), n.grad);
      adamw.step(0.01f);
    }
    const std::vector<float> v = n.value.to_floats();
    results.insert(results.end(), v.begin(), v.end());
  }
  for (int i = 0; i < 5; ++i) EXPECT_EQ(results[i], results[5 + i]) << i;
}

// Three steps on tensors of several odd shapes against torch.optim.AdamW, with different learning
// rates per step, a norm weight in the no-decay group and one parameter whose gradients are near
// eps so its eps placement matters.
TEST(AdamW, MatchesTorchAdamW) {
  namespace fs = std::filesystem;
  const AdamWOptions opt{.beta1 = 0.85f, .beta2 = 0.95f, .eps = 1e-6f, .weight_decay = 0.1f};
  const std::vector<float> lrs = {1e-2f, 3e-3f, 5e-3f};
  struct Spec {
    std::string name;
    Shape shape;
    bool decay;
    float grad_scale;
  };
  const std::vector<Spec> specs = {{"layers.0.attn.wq", {3, 5}, true, 1.0f},
                                   {"layers.0.moe.experts.w1", {2, 3, 7}, true, 0.1f},
                                   {"layers.0.attn_norm.weight", {5}, false, 1.0f},
                                   {"tiny_grads", {11}, true, 2e-6f},
                                   {"one", {1}, true, 1.0f}};
  ParamRegistry reg;
  for (const Spec& s : specs) add_param(reg, s.name, s.shape, s.decay);
  uint64_t seed = 100;
  for (Param& p : reg.params()) ops::copy(testing::random_tensor(p.value.shape(), seed++), p.value);

  const testing::TempDir dir;
  fs::create_directories(dir / "params");
  nlohmann::json cfg = {{"beta1", opt.beta1}, {"beta2", opt.beta2}, {"eps", opt.eps},
                        {"weight_decay", opt.weight_decay}, {"lrs", lrs}, {"params", nlohmann::json::array()}};
  for (const Spec& s : specs) cfg["params"].push_back({{"name", s.name}, {"weight_decay", s.decay}});
  std::ofstream(dir / "config.json") << cfg.dump(2);
  for (const Param& p : reg.params()) testing::write_npy(dir / ("params/" + p.spec.name + ".npy"), p.value);

  AdamW adamw(reg, opt);
  for (size_t step = 0; step < lrs.size(); ++step) {
    fs::create_directories(dir / ("grads/" + std::to_string(step)));
    for (size_t i = 0; i < specs.size(); ++i) {
      Param& p = reg.get(specs[i].name);
      ops::copy(testing::random_tensor(p.grad.shape(), 1000 + 10 * step + i, specs[i].grad_scale), p.grad);
      testing::write_npy(dir / ("grads/" + std::to_string(step) + "/" + p.spec.name + ".npy"), p.grad);
    }
    adamw.step(lrs[step]);
  }

  const std::string cmd = "/usr/bin/python3 " + testing::source_path("tests/reference/adamw_reference.py") +
                          " --dir " + dir.str();
  ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
  for (const Param& p : reg.params()) {
    const std::string base = dir / ("torch/" + p.spec.name);
    const std::vector<std::pair<std::string, Tensor>> outputs = {
        {"param", p.value}, {"exp_avg", adamw.exp_avg(p.spec.name)}, {"exp_avg_sq", adamw.exp_avg_sq(p.spec.name)}};
    for (const auto& [what, got] : outputs) {
      const std::vector<double> want = testing::to_double(testing::read_npy(base + "." + what + ".npy"));
      double max_abs = 0.0;
      for (double x : want) max_abs = std::max(max_abs, std::abs(x));
      // Elementwise 1e-6 relative; the 1e-7 * max floor only covers a moment that cancels to
      // nearly zero, where both sides hold rounding noise of the larger terms.
      testing::expect_close(got, want, 1e-6, 1e-7 * max_abs, p.spec.name + " " + what);
    }
  }
}

TEST(AdamW, StepCountAndResume) {
  const AdamWOptions opt{};
  const auto make = [](ParamRegistry& reg) {
    add_param(reg, "a", {4, 3}, true);
    add_param(reg, "b", {3}, false);
  };
  const auto set_grads = [](ParamRegistry& reg, uint64_t seed) {
    for (Param& p : reg.params()) ops::copy(testing::random_tensor(p.grad.shape(), seed++), p.grad);
  };
  ParamRegistry reg1, reg2;
  make(reg1);
  make(reg2);
  reg1.init(7);
  AdamW run(reg1, opt);
  EXPECT_EQ(run.steps(), 0);
  for (int s = 0; s < 2; ++s) {
    set_grads(reg1, 20 + 2 * s);
    run.step(1e-2f);
  }
  EXPECT_EQ(run.steps(), 2);

  // A resumed optimizer: parameters and state copied in through the accessors, the count set.
  AdamW resumed(reg2, opt);
  for (Param& p : reg2.params()) {
    ops::copy(reg1.get(p.spec.name).value, p.value);
    ops::copy(run.exp_avg(p.spec.name), resumed.exp_avg(p.spec.name));
    resumed.exp_avg_sq(p.spec.name) = run.exp_avg_sq(p.spec.name).clone();
  }
  resumed.set_steps(2);
  set_grads(reg1, 40);
  set_grads(reg2, 40);
  run.step(5e-3f);
  resumed.step(5e-3f);
  EXPECT_EQ(resumed.steps(), 3);
  for (const Param& p : reg2.params()) {
    const std::vector<float> want = reg1.get(p.spec.name).value.to_floats();
    const std::vector<float> got = p.value.to_floats();
    for (size_t i = 0; i < got.size(); ++i) EXPECT_EQ(got[i], want[i]) << p.spec.name << "[" << i << "]";
  }
}

// set_steps(5) makes the next update use t = 6 in both bias corrections.
TEST(AdamW, SetStepsSetsBiasCorrection) {
  const AdamWOptions opt{.beta1 = 0.9f, .beta2 = 0.99f, .eps = 1e-8f, .weight_decay = 0.1f};
  ParamRegistry reg;
  Param& p = add_param(reg, "p", {3}, true);
  set_values(p.value, {0.25f, -1.5f, 3.0f});
  set_values(p.grad, {0.5f, 0.125f, -2.0f});
  AdamW adamw(reg, opt);
  adamw.set_steps(5);
  adamw.step(0.02f);
  EXPECT_EQ(adamw.steps(), 6);
  const double p0[] = {0.25, -1.5, 3.0}, g[] = {0.5, 0.125, -2.0};
  for (int i = 0; i < 3; ++i) {
    RefAdamW ref{.beta1 = opt.beta1, .beta2 = opt.beta2, .eps = opt.eps, .wd = opt.weight_decay, .p = p0[i]};
    ref.step(g[i], double(0.02f), 6, true);
    expect_rel(p.value.data<float>()[i], ref.p, 1e-6, "p[" + std::to_string(i) + "]");
  }
}

TEST(AdamW, RejectsBadOptionsAndArguments) {
  ParamRegistry reg;
  add_param(reg, "w", {2}, true);
  EXPECT_EQ(error_of([&] { AdamW(reg, {.beta1 = 1.0f}); }), "optim.beta1 (1) must be in [0, 1)");
  EXPECT_EQ(error_of([&] { AdamW(reg, {.beta2 = -0.5f}); }), "optim.beta2 (-0.5) must be in [0, 1)");
  EXPECT_EQ(error_of([&] { AdamW(reg, {.eps = 0.0f}); }), "optim.eps (0) must be positive and finite");
  EXPECT_EQ(error_of([&] { AdamW(reg, {.weight_decay = -0.1f}); }),
            "optim.weight_decay (-0.1) must be non-negative and finite");

  AdamW adamw(reg, {});
  EXPECT_EQ(error_of([&] { adamw.step(-1e-3f); }), "AdamW::step: learning rate must be finite and >= 0, got -0.001");
  EXPECT_EQ(error_of([&] { adamw.step(NAN); }), "AdamW::step: learning rate must be finite and >= 0, got nan");
  EXPECT_EQ(error_of([&] { adamw.set_steps(-1); }), "AdamW::set_steps: step count must be >= 0, got -1");
  EXPECT_EQ(error_of([&] { adamw.exp_avg("nope"); }), "AdamW: no optimizer state for parameter nope");
  EXPECT_EQ(adamw.steps(), 0);

  adamw.exp_avg("w") = Tensor::zeros({3}, DType::kF32);
  EXPECT_EQ(error_of([&] { adamw.step(1e-3f); }),
            "AdamW::step: optimizer state of w is f32(3) cpu, expected f32(2) cpu");

  add_param(reg, "late", {2}, true);
  EXPECT_EQ(error_of([&] { adamw.step(1e-3f); }),
            "AdamW::step: the registry has 2 parameters but the optimizer was built for 1");
}

}  // namespace
}  // namespace moeforge
