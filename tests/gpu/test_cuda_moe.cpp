// Tests the CUDA MoE routing ops (runtime/cuda/router.cu, moe_dispatch.cu, grouped_gemm.cu)
// against the CPU ops: router top-k for both gatings with and without bias (the same experts,
// weights to 1e-5), its backward, the aux and z losses, the dispatch plan with dropped copies and
// the capacity rule (integers exactly equal; the counting sort of moe_dispatch.cu for k = 1, 2, 8,
// E up to 4096, N not a multiple of its tiles or warps), permute / unpermute both ways (float4
// rows and unaligned scalar rows, k = 1, 2, 8, dropped copies), and the grouped expert GEMM with
// empty experts. Outputs poisoned; fp32 to 1e-5.
#include <gtest/gtest.h>

#include <string>

#include "tests/gpu/gpu_testing.h"
#include "tests/testing.h"

namespace moeforge {
namespace {

using namespace gpu_testing;
using testing::random_ints;
using testing::random_tensor;

TEST(GpuMoe, RouterForwardBackwardAndLosses) {
  MOE_REQUIRE_GPU();
  const int64_t n = 203, e = 16;
  const int k = 4;
  const Tensor logits = random_tensor({n, e}, 1, 3.0f);
  const Tensor bias = random_tensor({e}, 2, 0.1f);
  for (ops::Gating g : {ops::Gating::kSoftmaxTopK, ops::Gating::kSigmoidTopK}) {
    for (bool with_bias : {false, true}) {
      const Tensor b = with_bias ? bias : Tensor();
      Tensor w = Tensor::empty({n, k}, DType::kF32), ex = Tensor::empty({n, k}, DType::kI32);
      Tensor probs = Tensor::empty({n, e}, DType::kF32);
      ops::router_fwd(logits, g, k, b, w, ex, probs);
      const Tensor gl = to_gpu(logits), gw = poisoned({n, k}), gex = poisoned({n, k}, DType::kI32);
      const Tensor gprobs = poisoned({n, e});
      ops::router_fwd(gl, g, k, with_bias ? to_gpu(bias) : Tensor(), gw, gex, gprobs);
      expect_equal_ints(gex, ex, "experts");
      EXPECT_GPU_CLOSE(gw, w, kF32Tol) << ops::gating_name(g);
      EXPECT_GPU_CLOSE(gprobs, probs, kF32Tol) << ops::gating_name(g);

      const Tensor dw = random_tensor({n, k}, 3), dp = random_tensor({n, e}, 4);
      Tensor dl = Tensor::empty({n, e}, DType::kF32);
      ops::router_bwd(logits, g, ex, dw, dp, dl);
      const Tensor gdl = poisoned({n, e});
      ops::router_bwd(gl, g, gex, to_gpu(dw), to_gpu(dp), gdl);
      EXPECT_GPU_CLOSE(gdl, dl, kF32Tol) << ops::gating_name(g);
    }
  }
  Tensor counts = Tensor::empty({e}, DType::kI64);
  for (int64_t i = 0; i < e; ++i) counts.data<int64_t>()[i] = 3 * i + 1;
  const Tensor probs = random_tensor({n, e}, 5);
  Tensor loss = Tensor::empty({1}, DType::kF32), dprobs = Tensor::empty({n, e}, DType::kF32);
  ops::moe_aux_loss_fwd(probs, counts, k, 2 * n, loss);
  ops::moe_aux_loss_bwd(probs, counts, k, 2 * n, 0.01f, dprobs);
  const Tensor gloss = poisoned({1}), gdprobs = poisoned({n, e});
  ops::moe_aux_loss_fwd(to_gpu(probs), to_gpu(counts), k, 2 * n, gloss);
  ops::moe_aux_loss_bwd(to_gpu(probs), to_gpu(counts), k, 2 * n, 0.01f, gdprobs);
  EXPECT_GPU_CLOSE(gloss, loss, kF32Tol);
  EXPECT_GPU_CLOSE(gdprobs, dprobs, kF32Tol);

  ops::router_z_loss_fwd(logits, n, loss);
  ops::router_z_loss_fwd(to_gpu(logits), n, gloss);
  EXPECT_GPU_CLOSE(gloss, loss, kF32Tol);
  Tensor dz = random_tensor({n, e}, 6);
  const Tensor gdz = to_gpu(dz);
  ops::router_z_loss_bwd(logits, n, 0.5f, dz);
  ops::router_z_loss_bwd(to_gpu(logits), n, 0.5f, gdz);
  EXPECT_GPU_CLOSE(gdz, dz, kF32Tol);
}

TEST(GpuMoe, PlanWithDroppedCopiesAndCapacityMatchTheCpuExactly) {
  MOE_REQUIRE_GPU();
  // Tiles are 256 ids (E, rounded up to a warp, for E > 256) and a warp steps 32 at a time: the
  // copy counts below are multiples of neither.
  const struct {
    int64_t n;
    int e;
  } sizes[] = {{1, 8}, {3001, 8}, {1029, 37}, {16411, 256}, {517, 4096}};
  for (const auto& sz : sizes)
    for (const int64_t k : {1, 2, 8}) {
      if (k > sz.e) continue;
      const int64_t n = sz.n;
      const int e = sz.e;
      SCOPED_TRACE("N=" + std::to_string(n) + " E=" + std::to_string(e) + " k=" + std::to_string(k));
      Tensor experts = random_ints({n, k}, 7 + n + k, 0, e);
      for (int64_t i = 0; i < n * k; i += 7) experts.data<int32_t>()[i] = -1;  // dropped copies
      Tensor positions = Tensor::empty({n, k}, DType::kI32), offsets = Tensor::empty({e + 1}, DType::kI64);
      ops::moe_plan(experts, e, positions, offsets);
      const Tensor gpos = poisoned({n, k}, DType::kI32), goff = poisoned({e + 1}, DType::kI64);
      ops::moe_plan(to_gpu(experts), e, gpos, goff);
      expect_equal_ints(gpos, positions, "positions");
      expect_equal_ints(goff, offsets, "offsets");

      const Tensor full = random_ints({n, k}, 8 + n + k, 0, e);
      Tensor base = Tensor::empty({k, e}, DType::kI64);
      for (int64_t i = 0; i < k * e; ++i) base.data<int64_t>()[i] = i % 5 * 40;
      const int64_t capacity = n / e + 60;  // drops some copies of the experts with a large base
      Tensor dispatch = Tensor::empty({n, k}, DType::kI32);
      ops::moe_apply_capacity(full, capacity, base, dispatch);
      const Tensor gdispatch = poisoned({n, k}, DType::kI32);
      ops::moe_apply_capacity(to_gpu(full), capacity, to_gpu(base), gdispatch);
      expect_equal_ints(gdispatch, dispatch, "dispatch");
    }
}

TEST(GpuMoe, PermuteAndUnpermuteBothWays) {
  MOE_REQUIRE_GPU();
  // c = 130: scalar rows (not 16-byte aligned); c = 256: float4 rows; c = 4: one vector per row.
  for (const int64_t c : {130, 256, 4})
    for (const int64_t k : {1, 2, 8}) {
      const int64_t n = 257;
      const int e = 9;
      SCOPED_TRACE("C=" + std::to_string(c) + " k=" + std::to_string(k));
      const DroppingPlan plan = dropping_plan(n, k, e, 9 + k);
      const Tensor& positions = plan.positions;
      const int64_t m = plan.m;
      const Tensor gpos = to_gpu(positions);

      const Tensor x = random_tensor({n, c}, 10);
      Tensor px = Tensor::empty({m, c}, DType::kF32);
      ops::moe_permute_fwd(x, positions, px);
      const Tensor gpx = poisoned({m, c});
      ops::moe_permute_fwd(to_gpu(x), gpos, gpx);
      EXPECT_GPU_CLOSE(gpx, px, 0.0);

      const Tensor dpx = random_tensor({m, c}, 11);
      Tensor dx = Tensor::empty({n, c}, DType::kF32);
      ops::moe_permute_bwd(dpx, positions, dx);
      const Tensor gdx = poisoned({n, c});
      ops::moe_permute_bwd(to_gpu(dpx), gpos, gdx);
      EXPECT_GPU_CLOSE(gdx, dx, kF32Tol);

      const Tensor y = random_tensor({m, c}, 12), weights = random_tensor({n, k}, 13);
      Tensor out = Tensor::empty({n, c}, DType::kF32);
      ops::moe_unpermute_fwd(y, positions, weights, out);
      const Tensor gout = poisoned({n, c});
      ops::moe_unpermute_fwd(to_gpu(y), gpos, to_gpu(weights), gout);
      EXPECT_GPU_CLOSE(gout, out, kF32Tol);

      const Tensor dout = random_tensor({n, c}, 14);
      Tensor dy = Tensor::empty({m, c}, DType::kF32), dw = Tensor::empty({n, k}, DType::kF32);
      ops::moe_unpermute_bwd(y, positions, weights, dout, dy, dw);
      const Tensor gdy = poisoned({m, c}), gdw = poisoned({n, k});
      ops::moe_unpermute_bwd(to_gpu(y), gpos, to_gpu(weights), to_gpu(dout), gdy, gdw);
      EXPECT_GPU_CLOSE(gdy, dy, kF32Tol);
      EXPECT_GPU_CLOSE(gdw, dw, kF32Tol);
    }
}

TEST(GpuMoe, LargePlanMatchesTheCpuAndIsTheSameOnEveryRun) {
  MOE_REQUIRE_GPU();
  // 1.2M copies: more than 4096 tiles of 256, so the tiles grow to 320 ids (routing_plan.h).
  const int64_t n = 150001, k = 8;
  const int e = 256;
  Tensor experts = random_ints({n, k}, 21, 0, e);
  for (int64_t i = 0; i < n * k; i += 13) experts.data<int32_t>()[i] = -1;
  Tensor positions = Tensor::empty({n, k}, DType::kI32), offsets = Tensor::empty({e + 1}, DType::kI64);
  ops::moe_plan(experts, e, positions, offsets);
  const Tensor gex = to_gpu(experts);
  const Tensor p1 = poisoned({n, k}, DType::kI32), p2 = poisoned({n, k}, DType::kI32);
  const Tensor o1 = poisoned({e + 1}, DType::kI64), o2 = poisoned({e + 1}, DType::kI64);
  ops::moe_plan(gex, e, p1, o1);
  ops::moe_plan(gex, e, p2, o2);
  expect_equal_ints(p1, positions, "positions");
  expect_equal_ints(o1, offsets, "offsets");
  expect_equal_ints(p2, to_cpu(p1), "positions of a second run");
  expect_equal_ints(o2, to_cpu(o1), "offsets of a second run");
}

TEST(GpuMoe, GroupedGemmWithEmptyAndUnevenExperts) {
  MOE_REQUIRE_GPU();
  const int64_t cin = 72, cout = 100;
  const std::vector<int64_t> rows = {0, 130, 1, 64, 0, 7};
  const int64_t e = static_cast<int64_t>(rows.size());
  Tensor offsets = Tensor::empty({e + 1}, DType::kI64);
  offsets.data<int64_t>()[0] = 0;
  for (int64_t i = 0; i < e; ++i) offsets.data<int64_t>()[i + 1] = offsets.data<int64_t>()[i] + rows[i];
  const int64_t m = offsets.data<int64_t>()[e];
  const Tensor x = random_tensor({m, cin}, 15), w = random_tensor({e, cout, cin}, 16);
  Tensor out = Tensor::empty({m, cout}, DType::kF32);
  ops::grouped_gemm_fwd(x, w, offsets, out);
  const Tensor gx = to_gpu(x), gw = to_gpu(w), goff = to_gpu(offsets), gout = poisoned({m, cout});
  ops::grouped_gemm_fwd(gx, gw, goff, gout);
  EXPECT_GPU_CLOSE(gout, out, kF32Tol);

  const Tensor dout = random_tensor({m, cout}, 17);
  Tensor dx = Tensor::empty({m, cin}, DType::kF32), dw = random_tensor({e, cout, cin}, 18);
  const Tensor gdx = poisoned({m, cin}), gdw = to_gpu(dw);
  ops::grouped_gemm_bwd(x, w, offsets, dout, dx, dw);
  ops::grouped_gemm_bwd(gx, gw, goff, to_gpu(dout), gdx, gdw);
  EXPECT_GPU_CLOSE(gdx, dx, kF32Tol);
  EXPECT_GPU_CLOSE(gdw, dw, kF32Tol);
}

}  // namespace
}  // namespace moeforge
