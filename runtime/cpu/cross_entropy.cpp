// CPU softmax cross-entropy over rows of V logits: the fused op, and the vocab-parallel one whose
// forward is split into per-shard row statistics and their combination.
//
// Forward: lse = m + log(sum_v exp(x_v - m)) with m the row maximum (so no exp overflows), the
// sum accumulated in double; loss = lse - x[target]. Vocab-parallel, each shard r reduces its
// valid columns to (m_r, s_r = sum exp(x_v - m_r), x[target] or 0) and the combination rescales
// the sums to the global maximum M: lse = M + log(sum_r s_r exp(m_r - M)), in double.
// Backward: softmax is rebuilt from the saved lse, exp(x_v - lse), without another pass for the
// maximum. Each element is read before it is written, so dlogits may alias logits. exp is
// simd_exp (~1 ulp), so the row loops vectorise.
#include <algorithm>
#include <cmath>
#include <limits>
#include <string_view>

#include "runtime/cpu/dense.h"
#include "runtime/cpu/simd_exp.h"

namespace moeforge::cpu {
namespace {

// Below this many elements a loop stays serial: thread start-up would cost more.
constexpr int64_t kParallelMinWork = 1 << 14;

// Negative targets mean "ignored"; anything else must be a token of the vocabulary [0, v).
// Checked before any thread starts, since an exception must not leave an OpenMP region.
void check_targets(std::string_view op, const int32_t* targets, int64_t n, int64_t v) {
  for (int64_t i = 0; i < n; ++i) {
    MOE_CHECK(targets[i] < v, "{}: target {} at position {} is outside the vocabulary [0, {})", op, targets[i], i,
              v);
  }
}

// Max and sum of exp(x - max) over x (v): the two statistics a softmax row reduces to. The sum is
// accumulated in double. Without columns: (-inf, 0), which the combination weighs as nothing.
struct RowStats {
  float max;
  double sum;
};

RowStats row_stats(const float* x, int64_t v) {
  if (v == 0) return {-std::numeric_limits<float>::infinity(), 0.0};
  float m = x[0];
#pragma omp simd reduction(max : m)
  for (int64_t j = 1; j < v; ++j) m = std::max(m, x[j]);
  double sum = 0.0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < v; ++j) sum += simd_exp(x[j] - m);
  return {m, sum};
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
#pragma omp parallel for schedule(static) if (n * v > kParallelMinWork)
  for (int64_t i = 0; i < n; ++i) {
    const float* xi = px + i * v;
    const RowStats st = row_stats(xi, v);
    const double row_lse = static_cast<double>(st.max) + std::log(st.sum);
    ps[i] = static_cast<float>(row_lse);
    pl[i] = pt[i] < 0 ? 0.0f : static_cast<float>(row_lse - xi[pt[i]]);
  }
}

void cross_entropy_partial_fwd(const Tensor& logits, const Tensor& targets, int64_t vocab_start, int64_t valid_cols,
                               const Tensor& partial) {
  const int64_t n = logits.dim(0);
  const int64_t v = logits.dim(1);
  const float* px = logits.data<float>();
  const int32_t* pt = targets.data<int32_t>();
  float* pp = partial.data<float>();
#pragma omp parallel for schedule(static) if (n * v > kParallelMinWork)
  for (int64_t i = 0; i < n; ++i) {
    const float* xi = px + i * v;
    const RowStats st = row_stats(xi, valid_cols);
    const int64_t col = static_cast<int64_t>(pt[i]) - vocab_start;  // negative targets land below 0
    float* out = pp + i * 3;
    out[0] = st.max;
    out[1] = static_cast<float>(st.sum);
    out[2] = pt[i] >= 0 && col >= 0 && col < valid_cols ? xi[col] : 0.0f;
  }
}

void cross_entropy_combine(const Tensor& partials, const Tensor& targets, int64_t vocab_size, const Tensor& losses,
                           const Tensor& lse) {
  const int64_t r_count = partials.dim(0);
  const int64_t n = partials.dim(1);
  const float* pp = partials.data<float>();
  const int32_t* pt = targets.data<int32_t>();
  float* pl = losses.data<float>();
  float* ps = lse.data<float>();
  check_targets("cross_entropy_combine", pt, n, vocab_size);
#pragma omp parallel for schedule(static) if (n * r_count > kParallelMinWork)
  for (int64_t i = 0; i < n; ++i) {
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t r = 0; r < r_count; ++r) m = std::max(m, pp[(r * n + i) * 3]);
    double sum = 0.0, target_logit = 0.0;
    for (int64_t r = 0; r < r_count; ++r) {
      const float* st = pp + (r * n + i) * 3;
      // A shard without valid columns (m_r = -inf, s_r = 0) adds 0 * exp(-inf) = 0.
      sum += static_cast<double>(st[1]) * std::exp(static_cast<double>(st[0]) - m);
      target_logit += st[2];
    }
    const double row_lse = static_cast<double>(m) + std::log(sum);
    ps[i] = static_cast<float>(row_lse);
    pl[i] = pt[i] < 0 ? 0.0f : static_cast<float>(row_lse - target_logit);
  }
}

void cross_entropy_bwd(const Tensor& logits, const Tensor& targets, const Tensor& lse, float scale,
                       const Tensor& dlogits, int64_t vocab_start, int64_t valid_cols) {
  const int64_t n = logits.dim(0);
  const int64_t v = logits.dim(1);
  const float* px = logits.data<float>();
  const int32_t* pt = targets.data<int32_t>();
  const float* ps = lse.data<float>();
  float* pd = dlogits.data<float>();
  if (valid_cols < 0) {
    check_targets("cross_entropy_bwd", pt, n, v);
    valid_cols = v;
  }
#pragma omp parallel for schedule(static) if (n * v > kParallelMinWork)
  for (int64_t i = 0; i < n; ++i) {
    const float* xi = px + i * v;
    float* di = pd + i * v;
    if (pt[i] < 0) {
      for (int64_t j = 0; j < v; ++j) di[j] = 0.0f;
      continue;
    }
    const float row_lse = ps[i];
#pragma omp simd
    for (int64_t j = 0; j < valid_cols; ++j) di[j] = scale * simd_exp(xi[j] - row_lse);
    for (int64_t j = valid_cols; j < v; ++j) di[j] = 0.0f;
    const int64_t col = static_cast<int64_t>(pt[i]) - vocab_start;
    if (col >= 0 && col < valid_cols) di[col] -= scale;
  }
}

}  // namespace moeforge::cpu
