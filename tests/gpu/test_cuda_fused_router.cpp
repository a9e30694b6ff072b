// Tests the warp-per-token router (runtime/cuda/fused_router.cu, behind ops::router_fwd and
// ops::router_bwd on CUDA) against the CPU op: the same experts (exactly), weights and probs, and
// dlogits, fp32 to 1e-5, for both gatings with and without the selection bias, k = 1, 2 and 8, and
// E = 8, 37 (not a multiple of the warp), 64 and 256; and ties, which both backends must break
// toward the lower expert id.
#include <gtest/gtest.h>

#include "tests/gpu/gpu_testing.h"
#include "tests/testing.h"

namespace moeforge {
namespace {

using namespace gpu_testing;
using testing::random_tensor;

void expect_router_matches(const Tensor& logits, ops::Gating g, int k, const Tensor& bias, const char* what) {
  const int64_t n = logits.dim(0), e = logits.dim(1);
  Tensor w = Tensor::empty({n, k}, DType::kF32), ex = Tensor::empty({n, k}, DType::kI32);
  Tensor probs = Tensor::empty({n, e}, DType::kF32);
  ops::router_fwd(logits, g, k, bias, w, ex, probs);
  const Tensor gl = to_gpu(logits), gw = poisoned({n, k}), gex = poisoned({n, k}, DType::kI32), gp = poisoned({n, e});
  ops::router_fwd(gl, g, k, bias.defined() ? to_gpu(bias) : Tensor(), gw, gex, gp);
  expect_equal_ints(gex, ex, what);
  EXPECT_GPU_CLOSE(gw, w, kF32Tol) << what << " " << ops::gating_name(g) << " E=" << e << " k=" << k;
  EXPECT_GPU_CLOSE(gp, probs, kF32Tol) << what << " " << ops::gating_name(g) << " E=" << e << " k=" << k;

  for (const bool with_dprobs : {false, true}) {
    const Tensor dw = random_tensor({n, k}, 11), dp = with_dprobs ? random_tensor({n, e}, 12) : Tensor();
    Tensor dl = Tensor::empty({n, e}, DType::kF32);
    ops::router_bwd(logits, g, ex, dw, dp, dl);
    const Tensor gdl = poisoned({n, e});
    ops::router_bwd(gl, g, gex, to_gpu(dw), with_dprobs ? to_gpu(dp) : Tensor(), gdl);
    EXPECT_GPU_CLOSE(gdl, dl, kF32Tol) << what << " " << ops::gating_name(g) << " E=" << e << " k=" << k
                                       << " dprobs=" << with_dprobs;
  }
}

TEST(GpuFusedRouter, MatchesTheCpuUpTo256Experts) {
  MOE_REQUIRE_GPU();
  for (const int64_t e : {8, 37, 64, 256})
    for (const int k : {1, 2, 8}) {
      if (k > e) continue;
      const Tensor logits = random_tensor({301, e}, 100 + e, 3.0f);
      const Tensor bias = random_tensor({e}, 200 + e, 0.1f);
      for (const ops::Gating g : {ops::Gating::kSoftmaxTopK, ops::Gating::kSigmoidTopK}) {
        expect_router_matches(logits, g, k, Tensor(), "no bias");
        expect_router_matches(logits, g, k, bias, "bias");
      }
    }
}

TEST(GpuFusedRouter, TiesGoToTheLowerExpertId) {
  MOE_REQUIRE_GPU();
  // Logits from {-1, 0, 1}: many exact ties among 64 experts in every row.
  const Tensor ints = testing::random_ints({97, 64}, 7, -1, 2);
  std::vector<float> v(ints.numel());
  for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>(ints.data<int32_t>()[i]);
  const Tensor logits = Tensor::from_floats({97, 64}, v);
  for (const ops::Gating g : {ops::Gating::kSoftmaxTopK, ops::Gating::kSigmoidTopK})
    for (const int k : {2, 8}) expect_router_matches(logits, g, k, Tensor(), "ties");
}

}  // namespace
}  // namespace moeforge
