// The token-dispatch plan (a stable counting sort of token copies by expert) and the permute /
// unpermute row gathers that move tokens into and out of the expert-grouped buffer.
#include <cstring>
#include <string_view>
#include <vector>

#include "runtime/cpu/moe.h"

namespace moeforge::cpu {
namespace {

// Below this many elements of work a loop stays serial: thread start-up would cost more.
constexpr int64_t kParallelMinWork = 1 << 15;

// positions (N, K) index rows of an (M, C) buffer. Scatters into that buffer need every row
// written exactly once, so they also require a permutation (with M = N * K, in range and distinct
// is exactly that); gathers only need the range.
void check_positions(std::string_view op, const Tensor& positions, int64_t m, bool permutation) {
  const int64_t n_rows = positions.dim(0);
  const int64_t k = positions.dim(1);
  const int32_t* pp = positions.data<int32_t>();
  std::vector<uint8_t> seen(permutation ? m : 0, 0);
  for (int64_t n = 0; n < n_rows; ++n)
    for (int64_t j = 0; j < k; ++j) {
      const int32_t p = pp[n * k + j];
      MOE_CHECK(p >= 0 && p < m, "{}: positions[{}, {}] = {} is out of range [0, {})", op, n, j, p, m);
      if (!permutation) continue;
      MOE_CHECK(!seen[p], "{}: positions[{}, {}] = {} repeats an earlier copy's row; positions must be a permutation of [0, {})",
                op, n, j, p, m);
      seen[p] = 1;
    }
}

}  // namespace

void check_expert_ids(std::string_view op, const Tensor& experts, int64_t num_experts) {
  const int64_t n_rows = experts.dim(0);
  const int64_t k = experts.dim(1);
  const int32_t* pe = experts.data<int32_t>();
  for (int64_t n = 0; n < n_rows; ++n)
    for (int64_t j = 0; j < k; ++j) {
      const int32_t e = pe[n * k + j];
      MOE_CHECK(e >= 0 && e < num_experts, "{}: experts[{}, {}] = {} is out of range [0, {})", op, n, j, e,
                num_experts);
    }
}

// Counting sort, serial: O(N K) integer work, a small fraction of one permute's row copies, and
// the stable (n, k) order inside each expert falls out of a single forward pass.
void moe_plan(const Tensor& experts, int num_experts, const Tensor& positions, const Tensor& offsets) {
  check_expert_ids("moe_plan", experts, num_experts);
  const int64_t m = experts.numel();
  const int32_t* pe = experts.data<int32_t>();
  int32_t* pp = positions.data<int32_t>();
  int64_t* po = offsets.data<int64_t>();
  for (int e = 0; e <= num_experts; ++e) po[e] = 0;
  for (int64_t i = 0; i < m; ++i) ++po[pe[i] + 1];
  for (int e = 0; e < num_experts; ++e) po[e + 1] += po[e];
  std::vector<int64_t> cursor(po, po + num_experts);
  for (int64_t i = 0; i < m; ++i) pp[i] = static_cast<int32_t>(cursor[pe[i]]++);
}

void moe_permute_fwd(const Tensor& x, const Tensor& positions, const Tensor& out) {
  const int64_t n_rows = x.dim(0);
  const int64_t c = x.dim(1);
  const int64_t k = positions.dim(1);
  check_positions("moe_permute_fwd", positions, out.dim(0), /*permutation=*/true);
  const float* px = x.data<float>();
  const int32_t* pp = positions.data<int32_t>();
  float* po = out.data<float>();
#pragma omp parallel for schedule(static) if (n_rows * k * c > kParallelMinWork)
  for (int64_t n = 0; n < n_rows; ++n)
    for (int64_t j = 0; j < k; ++j)
      std::memcpy(po + static_cast<int64_t>(pp[n * k + j]) * c, px + n * c, sizeof(float) * c);
}

void moe_permute_bwd(const Tensor& dout, const Tensor& positions, const Tensor& dx) {
  const int64_t n_rows = dx.dim(0);
  const int64_t c = dx.dim(1);
  const int64_t k = positions.dim(1);
  check_positions("moe_permute_bwd", positions, dout.dim(0), /*permutation=*/false);
  const float* pd = dout.data<float>();
  const int32_t* pp = positions.data<int32_t>();
  float* px = dx.data<float>();
#pragma omp parallel for schedule(static) if (n_rows * k * c > kParallelMinWork)
  for (int64_t n = 0; n < n_rows; ++n) {
    float* dst = px + n * c;
    std::memcpy(dst, pd + static_cast<int64_t>(pp[n * k]) * c, sizeof(float) * c);
    for (int64_t j = 1; j < k; ++j) {
      const float* src = pd + static_cast<int64_t>(pp[n * k + j]) * c;
#pragma omp simd
      for (int64_t i = 0; i < c; ++i) dst[i] += src[i];
    }
  }
}

void moe_unpermute_fwd(const Tensor& y, const Tensor& positions, const Tensor& weights, const Tensor& out) {
  const int64_t n_rows = out.dim(0);
  const int64_t c = out.dim(1);
  const int64_t k = positions.dim(1);
  check_positions("moe_unpermute_fwd", positions, y.dim(0), /*permutation=*/false);
  const float* py = y.data<float>();
  const int32_t* pp = positions.data<int32_t>();
  const float* pw = weights.data<float>();
  float* po = out.data<float>();
#pragma omp parallel for schedule(static) if (n_rows * k * c > kParallelMinWork)
  for (int64_t n = 0; n < n_rows; ++n) {
    float* dst = po + n * c;
    const float w0 = pw[n * k];
    const float* src0 = py + static_cast<int64_t>(pp[n * k]) * c;
#pragma omp simd
    for (int64_t i = 0; i < c; ++i) dst[i] = w0 * src0[i];
    for (int64_t j = 1; j < k; ++j) {
      const float w = pw[n * k + j];
      const float* src = py + static_cast<int64_t>(pp[n * k + j]) * c;
#pragma omp simd
      for (int64_t i = 0; i < c; ++i) dst[i] += w * src[i];
    }
  }
}

void moe_unpermute_bwd(const Tensor& y, const Tensor& positions, const Tensor& weights, const Tensor& dout,
                       const Tensor& dy, const Tensor& dweights) {
  const int64_t n_rows = dout.dim(0);
  const int64_t c = dout.dim(1);
  const int64_t k = positions.dim(1);
  check_positions("moe_unpermute_bwd", positions, y.dim(0), /*permutation=*/true);
  const float* py = y.data<float>();
  const int32_t* pp = positions.data<int32_t>();
  const float* pw = weights.data<float>();
  const float* pd = dout.data<float>();
  float* pdy = dy.data<float>();
  float* pdw = dweights.data<float>();
#pragma omp parallel for schedule(static) if (n_rows * k * c > kParallelMinWork)
  for (int64_t n = 0; n < n_rows; ++n) {
    const float* g = pd + n * c;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t row = pp[n * k + j];
      const float w = pw[n * k + j];
      const float* src = py + row * c;
      float* dst = pdy + row * c;
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t i = 0; i < c; ++i) {
        dst[i] = w * g[i];
        dot += g[i] * src[i];
      }
      pdw[n * k + j] = dot;
    }
  }
}

}  // namespace moeforge::cpu
