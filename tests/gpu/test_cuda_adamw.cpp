// Tests the multi-tensor AdamW of runtime/cuda/adamw.{h,cu} against the update of
// optim/adamw.cpp written out on the CPU: many tensors (more than one launch's worth, sizes not
// multiples of the chunk), with and without weight decay, three steps, and the bf16 copy of the
// master weights equal to the CPU's rounding of the CPU result.
#include <gtest/gtest.h>

#include <cmath>

#include "runtime/cuda/adamw.h"
#include "tests/gpu/gpu_testing.h"
#include "tests/testing.h"

namespace moeforge {
namespace {

using namespace gpu_testing;

cuda::AdamWCoefficients coefficients(float lr, int64_t t) {
  const double b1 = 0.9, b2 = 0.95, wd = 0.1;
  return {static_cast<float>(1.0 - lr * wd), 0.9f, static_cast<float>(1.0 - b1), 0.95f,
          static_cast<float>(1.0 - b2), static_cast<float>(lr / (1.0 - std::pow(b1, t))),
          static_cast<float>(std::sqrt(1.0 - std::pow(b2, t))), 1e-8f};
}

void cpu_update(Tensor& p, const Tensor& g, Tensor& m, Tensor& v, const cuda::AdamWCoefficients& c, bool decay) {
  float* pp = p.data<float>();
  const float* pg = g.data<float>();
  float* pm = m.data<float>();
  float* pv = v.data<float>();
  for (int64_t i = 0; i < p.numel(); ++i) {
    const float mi = c.beta1 * pm[i] + c.one_minus_beta1 * pg[i];
    const float vi = c.beta2 * pv[i] + c.one_minus_beta2 * pg[i] * pg[i];
    pm[i] = mi;
    pv[i] = vi;
    pp[i] = pp[i] * (decay ? c.decay : 1.0f) - c.step_size * (mi / (std::sqrt(vi) / c.bias2_sqrt + c.eps));
  }
}

TEST(GpuAdamW, MultiTensorUpdateMatchesTheCpuFormula) {
  MOE_REQUIRE_GPU();
  std::vector<int64_t> sizes = {1, 3, 65536, 65537, 200000};
  for (int i = 0; i < 40; ++i) sizes.push_back(17 * i + 5);  // more tensors than one launch holds
  std::vector<Tensor> p, g, m, v;
  std::vector<cuda::AdamWEntry> entries;
  for (size_t i = 0; i < sizes.size(); ++i) {
    p.push_back(testing::random_tensor({sizes[i]}, 100 + i));
    g.push_back(testing::random_tensor({sizes[i]}, 200 + i, 0.01f));
    m.push_back(Tensor::zeros({sizes[i]}, DType::kF32));
    v.push_back(Tensor::zeros({sizes[i]}, DType::kF32));
    entries.push_back({to_gpu(p[i]), to_gpu(g[i]), to_gpu(m[i]), to_gpu(v[i]), poisoned({sizes[i]}, DType::kBF16),
                       i % 2 == 0});
  }
  for (int64_t t = 1; t <= 3; ++t) {
    const cuda::AdamWCoefficients c = coefficients(1e-2f, t);
    for (size_t i = 0; i < sizes.size(); ++i) cpu_update(p[i], g[i], m[i], v[i], c, i % 2 == 0);
    cuda::adamw_step(entries, c);
  }
  for (size_t i = 0; i < sizes.size(); ++i) {
    EXPECT_GPU_CLOSE(entries[i].master, p[i], kF32Tol) << " tensor " << i;
    EXPECT_GPU_CLOSE(entries[i].exp_avg, m[i], kF32Tol) << " tensor " << i;
    EXPECT_GPU_CLOSE(entries[i].exp_avg_sq, v[i], kF32Tol) << " tensor " << i;
    EXPECT_GPU_CLOSE(entries[i].param_bf16, to_cpu(entries[i].master).to(DType::kBF16).to(DType::kF32), 0.0)
        << " tensor " << i;
  }
}

}  // namespace
}  // namespace moeforge
