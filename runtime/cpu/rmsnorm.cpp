// CPU RMSNorm, forward and backward, over rows of width C.
//
// Backward. With y_j = x_j r w_j and r = (mean(x^2) + eps)^(-1/2), dr/dx_i = -r^3 x_i / C, so for
// g = w * dout:
//   dx_i = r g_i - x_i r^3 mean_j(g_j x_j)
//   dw_j = sum_n dout_nj x_nj r_n
// dw is a reduction over rows: each fixed block of rows (sized from N alone, never from the
// thread count) sums into its own partial, and the partials are added in block order, so the
// result does not depend on how many threads ran.
#include <algorithm>
#include <cmath>
#include <vector>

#include "runtime/cpu/dense.h"

namespace moeforge::cpu {
namespace {

constexpr int64_t kMaxRowBlocks = 64;
constexpr int64_t kMinRowsPerBlock = 16;

}  // namespace

void rmsnorm_fwd(const Tensor& x, const Tensor& w, float eps, const Tensor& out, const Tensor& rstd) {
  const int64_t c = w.numel();
  const int64_t n = x.numel() / c;
  const float* px = x.data<float>();
  const float* pw = w.data<float>();
  float* po = out.data<float>();
  float* pr = rstd.data<float>();
#pragma omp parallel for schedule(static) if (n * c > (1 << 15))
  for (int64_t i = 0; i < n; ++i) {
    const float* xi = px + i * c;
    float* oi = po + i * c;
    // Summing squares in double keeps rstd exact to f32 rounding for any C.
    double ss = 0.0;
#pragma omp simd reduction(+ : ss)
    for (int64_t j = 0; j < c; ++j) ss += static_cast<double>(xi[j]) * xi[j];
    const float r = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(c) + eps));
    pr[i] = r;
#pragma omp simd
    for (int64_t j = 0; j < c; ++j) oi[j] = xi[j] * r * pw[j];
  }
}

void rmsnorm_bwd(const Tensor& x, const Tensor& w, const Tensor& rstd, const Tensor& dout, const Tensor& dx,
                 const Tensor& dw) {
  const int64_t c = w.numel();
  const int64_t n = x.numel() / c;
  const float* px = x.data<float>();
  const float* pw = w.data<float>();
  const float* pr = rstd.data<float>();
  const float* pd = dout.data<float>();
  float* pdx = dx.data<float>();
  float* pdw = dw.data<float>();

  const int64_t rows_per_block = std::max(kMinRowsPerBlock, (n + kMaxRowBlocks - 1) / kMaxRowBlocks);
  const int64_t blocks = (n + rows_per_block - 1) / rows_per_block;
  std::vector<float> partial(static_cast<size_t>(blocks * c), 0.0f);  // (blocks, C)

#pragma omp parallel for schedule(static) if (n * c > (1 << 15))
  for (int64_t b = 0; b < blocks; ++b) {
    float* part = partial.data() + b * c;
    const int64_t end = std::min(n, (b + 1) * rows_per_block);
    for (int64_t i = b * rows_per_block; i < end; ++i) {
      const float* xi = px + i * c;
      const float* di = pd + i * c;
      float* dxi = pdx + i * c;
      const float r = pr[i];
      double gx = 0.0;
#pragma omp simd reduction(+ : gx)
      for (int64_t j = 0; j < c; ++j) gx += static_cast<double>(pw[j]) * di[j] * xi[j];
      const float coef = static_cast<float>(static_cast<double>(r) * r * r * gx / static_cast<double>(c));
#pragma omp simd
      for (int64_t j = 0; j < c; ++j) {
        dxi[j] = r * pw[j] * di[j] - xi[j] * coef;
        part[j] += di[j] * xi[j] * r;
      }
    }
  }

#pragma omp parallel for schedule(static) if (blocks * c > (1 << 15))
  for (int64_t j = 0; j < c; ++j) {
    float s = 0.0f;
    for (int64_t b = 0; b < blocks; ++b) s += partial[b * c + j];
    pdw[j] += s;
  }
}

}  // namespace moeforge::cpu
