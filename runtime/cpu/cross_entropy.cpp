// CPU fused softmax cross-entropy over rows of V logits.
//
// Forward: lse = m + log(sum_v exp(x_v - m)) with m the row maximum (so no exp overflows), the
// sum accumulated in double; loss = lse - x[target]. Backward: softmax is rebuilt from the saved
// lse, exp(x_v - lse), without another pass for the maximum. Each element is read before it is
// written, so dlogits may alias logits. exp is simd_exp (~1 ulp), so the row loops vectorise.
#include <algorithm>
#include <cmath>
#include <string_view>

#include "runtime/cpu/dense.h"
#include "runtime/cpu/simd_exp.h"

namespace moeforge::cpu {
namespace {

// Negative targets mean "ignored"; anything else must index a logit. Checked before any thread
// starts, since an exception must not leave an OpenMP region.
void check_targets(std::string_view op, const int32_t* targets, int64_t n, int64_t v) {
  for (int64_t i = 0; i < n; ++i) {
    MOE_CHECK(targets[i] < v, "{}: target {} at position {} is outside the vocabulary [0, {})", op, targets[i], i,
              v);
  }
}

}  // namespace

void cross_entropy_fwd(const Tensor& logits, const Tensor& targets, const Tensor& losses, const Tensor& lse) {
  const int64_t n = logits.dim(0);
  const int64_t v = logits.dim(1);
  const float* px = logits.data<float>();
  const int32_t* pt = targets.data<int32_t>();
  float* pl = losses.data<float>();
  float* ps = lse.data<float>();
  check_targets("cross_entropy_fwd", pt, n, v);
#pragma omp parallel for schedule(static) if (n * v > (1 << 14))
  for (int64_t i = 0; i < n; ++i) {
    const float* xi = px + i * v;
    float m = xi[0];
#pragma omp simd reduction(max : m)
    for (int64_t j = 1; j < v; ++j) m = std::max(m, xi[j]);
    double sum = 0.0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < v; ++j) sum += simd_exp(xi[j] - m);
    const double row_lse = static_cast<double>(m) + std::log(sum);
    ps[i] = static_cast<float>(row_lse);
    pl[i] = pt[i] < 0 ? 0.0f : static_cast<float>(row_lse - xi[pt[i]]);
  }
}

void cross_entropy_bwd(const Tensor& logits, const Tensor& targets, const Tensor& lse, float scale,
                       const Tensor& dlogits) {
  const int64_t n = logits.dim(0);
  const int64_t v = logits.dim(1);
  const float* px = logits.data<float>();
  const int32_t* pt = targets.data<int32_t>();
  const float* ps = lse.data<float>();
  float* pd = dlogits.data<float>();
  check_targets("cross_entropy_bwd", pt, n, v);
#pragma omp parallel for schedule(static) if (n * v > (1 << 14))
  for (int64_t i = 0; i < n; ++i) {
    const float* xi = px + i * v;
    float* di = pd + i * v;
    if (pt[i] < 0) {
      for (int64_t j = 0; j < v; ++j) di[j] = 0.0f;
      continue;
    }
    const float row_lse = ps[i];
#pragma omp simd
    for (int64_t j = 0; j < v; ++j) di[j] = scale * simd_exp(xi[j] - row_lse);
    di[pt[i]] -= scale;
  }
}

}  // namespace moeforge::cpu
