#include "runtime/cpu/elementwise.h"

#include <cblas.h>

#include <cstring>

#include "runtime/half.h"
#include "runtime/op_checks.h"

namespace moeforge::cpu {

void fill(const Tensor& t, float value) {
  const int64_t n = t.numel();
  if (t.dtype() == DType::kF32) {
    float* p = t.data<float>();
#pragma omp parallel for simd schedule(static) if (n > (1 << 16))
    for (int64_t i = 0; i < n; ++i) p[i] = value;
    return;
  }
  if (t.dtype() == DType::kBF16) {
    const bf16 v = to_bf16(value);
    bf16* p = t.data<bf16>();
    for (int64_t i = 0; i < n; ++i) p[i] = v;
    return;
  }
  if (t.dtype() == DType::kI32) {
    int32_t* p = t.data<int32_t>();
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<int32_t>(value);
    return;
  }
  if (t.dtype() == DType::kI64) {
    int64_t* p = t.data<int64_t>();
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<int64_t>(value);
    return;
  }
  MOE_THROW("fill: CPU kernel supports f32, bf16, i32 and i64, got {}", t.str());
}

void copy(const Tensor& src, const Tensor& dst) {
  if (src.nbytes()) std::memcpy(dst.raw_data(), src.raw_data(), src.nbytes());
}

void cast(const Tensor& src, const Tensor& dst) {
  const int64_t n = src.numel();
  if (src.dtype() == dst.dtype()) return copy(src, dst);
  if (src.dtype() == DType::kF32 && dst.dtype() == DType::kBF16) {
    const float* ps = src.data<float>();
    bf16* pd = dst.data<bf16>();
#pragma omp parallel for simd schedule(static) if (n > (1 << 16))
    for (int64_t i = 0; i < n; ++i) pd[i] = to_bf16(ps[i]);
    return;
  }
  if (src.dtype() == DType::kBF16 && dst.dtype() == DType::kF32) {
    const bf16* ps = src.data<bf16>();
    float* pd = dst.data<float>();
#pragma omp parallel for simd schedule(static) if (n > (1 << 16))
    for (int64_t i = 0; i < n; ++i) pd[i] = to_float(ps[i]);
    return;
  }
  MOE_THROW("cast: CPU kernel converts between f32 and bf16, got {} -> {}", src.str(), dst.str());
}

void add(const Tensor& a, const Tensor& b, const Tensor& out) {
  const float* pa = a.data<float>();
  const float* pb = b.data<float>();
  float* po = out.data<float>();
  const int64_t n = a.numel();
#pragma omp parallel for simd schedule(static) if (n > (1 << 16))
  for (int64_t i = 0; i < n; ++i) po[i] = pa[i] + pb[i];
}

void add_(const Tensor& dst, const Tensor& src, float alpha) {
  float* pd = dst.data<float>();
  const float* ps = src.data<float>();
  const int64_t n = dst.numel();
#pragma omp parallel for simd schedule(static) if (n > (1 << 16))
  for (int64_t i = 0; i < n; ++i) pd[i] += alpha * ps[i];
}

void scale_(const Tensor& t, float alpha) {
  float* p = t.data<float>();
  const int64_t n = t.numel();
#pragma omp parallel for simd schedule(static) if (n > (1 << 16))
  for (int64_t i = 0; i < n; ++i) p[i] *= alpha;
}

double sum_squares(const Tensor& t) {
  const float* p = t.data<float>();
  const int64_t n = t.numel();
  double s = 0.0;
#pragma omp parallel for reduction(+ : s) schedule(static) if (n > (1 << 16))
  for (int64_t i = 0; i < n; ++i) s += static_cast<double>(p[i]) * p[i];
  return s;
}

void gemm(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, const Tensor& c, bool accumulate,
          float alpha) {
  using ops::detail::matrix_cols;
  using ops::detail::matrix_rows;
  const int64_t m = matrix_rows(c);
  const int64_t n = matrix_cols(c);
  const int64_t k = trans_a ? matrix_rows(a) : matrix_cols(a);
  if (m == 0 || n == 0) return;
  if (k == 0) {
    if (!accumulate) fill(c, 0.0f);
    return;
  }
  cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans,
              static_cast<blasint>(m), static_cast<blasint>(n), static_cast<blasint>(k), alpha, a.data<float>(),
              static_cast<blasint>(matrix_cols(a)), b.data<float>(), static_cast<blasint>(matrix_cols(b)),
              accumulate ? 1.0f : 0.0f, c.data<float>(), static_cast<blasint>(n));
}

}  // namespace moeforge::cpu
