// bf16 mixed precision in the model (ModelConfig::compute_dtype, ParamRegistry compute copies):
//  - f32 mode keeps one tensor per parameter (compute is value itself);
//  - bf16 mode gives every trainable parameter a bf16 copy that is exactly the rounding of its
//    f32 master, refreshed on demand; state (the expert bias) stays f32 and shared;
//  - a bf16 forward/backward tracks the f32 one from the same weights: the loss to a few 1e-3,
//    every gradient (kept in f32) to bf16's resolution; activations take about half the memory.
#include <gtest/gtest.h>

#include <cstring>

#include "models/transformer.h"
#include "tests/testing.h"

namespace moeforge {
namespace {

using testing::random_ints;

ModelConfig config(DType dtype) {
  ModelConfig c;
  c.vocab_size = 37;
  c.dim = 32;
  c.n_layers = 3;
  c.n_dense_layers = 1;
  c.dense_hidden = 40;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.head_dim = 8;
  c.n_experts = 4;
  c.top_k = 2;
  c.expert_hidden = 24;
  c.n_shared_experts = 1;
  c.aux_loss_coef = 0.01f;
  c.z_loss_coef = 0.001f;
  c.expert_bias_update_rate = 1e-3f;
  c.init_std = 0.1f;
  c.compute_dtype = dtype;
  return c;
}

bool same_bits(const Tensor& a, const Tensor& b) {
  return a.nbytes() == b.nbytes() && std::memcmp(a.raw_data(), b.raw_data(), a.nbytes()) == 0;
}

TEST(MixedPrecision, Fp32ModeSharesTheMasters) {
  MoeTransformer m(config(DType::kF32));
  m.registry().init(3);
  EXPECT_EQ(m.compute_dtype(), DType::kF32);
  for (const Param& p : m.registry().params()) EXPECT_TRUE(p.compute.shares_storage(p.value)) << p.spec.name;
}

TEST(MixedPrecision, Bf16CopiesAreTheRoundedMasters) {
  MoeTransformer m(config(DType::kBF16));
  m.registry().init(3);
  int copies = 0;
  for (const Param& p : m.registry().params()) {
    if (!p.spec.trainable) {  // the expert bias: f32 state, read by the router in f32
      EXPECT_TRUE(p.compute.shares_storage(p.value)) << p.spec.name;
      continue;
    }
    ASSERT_EQ(p.compute.dtype(), DType::kBF16) << p.spec.name;
    EXPECT_TRUE(same_bits(p.compute, p.value.to(DType::kBF16))) << p.spec.name;
    ++copies;
  }
  EXPECT_GT(copies, 10);
  // A changed master reaches its copy at the next refresh, not before.
  Param& w = m.registry().get("layers.1.attn.wq");
  ops::scale_(w.value, 1.5f);
  EXPECT_FALSE(same_bits(w.compute, w.value.to(DType::kBF16)));
  m.registry().refresh_compute();
  EXPECT_TRUE(same_bits(w.compute, w.value.to(DType::kBF16)));
}

TEST(MixedPrecision, Bf16StepTracksFp32) {
  const Tensor tokens = random_ints({2, 16}, 5, 0, 37), targets = random_ints({2, 16}, 6, 0, 37);
  MoeTransformer f32(config(DType::kF32)), b16(config(DType::kBF16));
  f32.registry().init(7);
  b16.registry().init(7);
  const LossReport lf = f32.forward(tokens, targets);
  const int64_t bytes_f32 = f32.activation_bytes();
  f32.backward();
  const LossReport lb = b16.forward(tokens, targets);
  const int64_t bytes_b16 = b16.activation_bytes();
  b16.backward();
  EXPECT_NEAR(lb.loss, lf.loss, 5e-3 * lf.loss);
  EXPECT_NEAR(lb.ce, lf.ce, 5e-3 * lf.ce);
  EXPECT_NEAR(lb.aux, lf.aux, 2e-2 * lf.aux);
  EXPECT_LT(static_cast<double>(bytes_b16), 0.65 * static_cast<double>(bytes_f32))
      << "bf16 activations (statistics and routing stay f32)";
  for (const Param& p : f32.registry().params()) {
    const Param& q = b16.registry().get(p.spec.name);
    ASSERT_EQ(q.grad.dtype(), DType::kF32) << p.spec.name << ": gradients stay f32";
    if (!p.spec.trainable) continue;
    const double err = testing::rel_error(testing::to_double(q.grad), testing::to_double(p.grad));
    EXPECT_LT(err, 5e-2) << p.spec.name;
  }
}

}  // namespace
}  // namespace moeforge
