// Tests the CUDA causal grouped-query attention (runtime/cuda/attention.cu) against the CPU op:
// forward output and lse, and dq, dk, dv, for GQA ratios 1, 2 and 4, head dims 16, 64, 80 and
// 128, and T not a multiple of the CPU's tile; outputs poisoned with NaN, fp32 to 1e-5.
#include <gtest/gtest.h>

#include <cmath>

#include "tests/gpu/gpu_testing.h"
#include "tests/testing.h"

namespace moeforge {
namespace {

using namespace gpu_testing;
using testing::random_tensor;

struct Case {
  int64_t b, t, h, hkv, d;
};

TEST(GpuAttention, ForwardAndBackwardMatchTheCpu) {
  MOE_REQUIRE_GPU();
  for (const Case c : {Case{1, 1, 1, 1, 16}, Case{2, 37, 4, 4, 64}, Case{1, 70, 8, 2, 80}, Case{2, 129, 4, 1, 128}}) {
    const Shape qs{c.b, c.t, c.h, c.d}, ks{c.b, c.t, c.hkv, c.d}, ls{c.b, c.h, c.t};
    const Tensor q = random_tensor(qs, 1), k = random_tensor(ks, 2), v = random_tensor(ks, 3);
    const Tensor dout = random_tensor(qs, 4);
    const float scale = 1.0f / std::sqrt(static_cast<float>(c.d));
    Tensor out = Tensor::empty(qs, DType::kF32), lse = Tensor::empty(ls, DType::kF32);
    ops::attention_fwd(q, k, v, scale, out, lse);
    Tensor dq = Tensor::empty(qs, DType::kF32), dk = Tensor::empty(ks, DType::kF32), dv = Tensor::empty(ks, DType::kF32);
    ops::attention_bwd(q, k, v, out, lse, dout, scale, dq, dk, dv);

    const Tensor gq = to_gpu(q), gk = to_gpu(k), gv = to_gpu(v);
    const Tensor gout = poisoned(qs), glse = poisoned(ls);
    ops::attention_fwd(gq, gk, gv, scale, gout, glse);
    EXPECT_GPU_CLOSE(gout, out, kF32Tol) << " T=" << c.t << " H=" << c.h << " Hkv=" << c.hkv << " D=" << c.d;
    EXPECT_GPU_CLOSE(glse, lse, kF32Tol);
    const Tensor gdq = poisoned(qs), gdk = poisoned(ks), gdv = poisoned(ks);
    ops::attention_bwd(gq, gk, gv, gout, glse, to_gpu(dout), scale, gdq, gdk, gdv);
    EXPECT_GPU_CLOSE(gdq, dq, kF32Tol) << " T=" << c.t << " D=" << c.d;
    EXPECT_GPU_CLOSE(gdk, dk, kF32Tol) << " T=" << c.t << " D=" << c.d;
    EXPECT_GPU_CLOSE(gdv, dv, kF32Tol) << " T=" << c.t << " D=" << c.d;
  }
}

TEST(GpuAttention, HeadDimAboveTheKernelLimitIsAnError) {
  MOE_REQUIRE_GPU();
  const Tensor q = poisoned({1, 2, 1, 257});
  const Tensor lse = poisoned({1, 1, 2});
  const std::string msg = testing::error_of([&] { ops::attention_fwd(q, q, q, 1.0f, q, lse); });
  EXPECT_NE(msg.find("head dim 257"), std::string::npos) << msg;
}

}  // namespace
}  // namespace moeforge
