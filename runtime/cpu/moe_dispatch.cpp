// The token-dispatch plan (a stable counting sort of token copies by expert) and the permute /
// unpermute row gathers that move tokens into and out of the expert-grouped buffer.
#include <algorithm>
#include <cstring>
#include <string_view>
#include <vector>

#include "runtime/cpu/moe.h"

namespace moeforge::cpu {
namespace {

// Below this many elements of work a loop stays serial: thread start-up would cost more.
constexpr int64_t kParallelMinWork = 1 << 15;

// positions (N, K) index rows of an (M, C) buffer; -1 marks a dropped copy (no row). Scatters
// into that buffer need every row written exactly once, so they also require the kept copies'
// positions to be a permutation of [0, M) (in range, distinct, and M of them); gathers only need
// the range.
void check_positions(std::string_view op, const Tensor& positions, int64_t m, bool permutation) {
  const int64_t n_rows = positions.dim(0);
  const int64_t k = positions.dim(1);
  const int32_t* pp = positions.data<int32_t>();
  std::vector<uint8_t> seen(permutation ? m : 0, 0);
  int64_t kept = 0;
  for (int64_t n = 0; n < n_rows; ++n)
    for (int64_t j = 0; j < k; ++j) {
      const int32_t p = pp[n * k + j];
      if (p == -1) continue;
      MOE_CHECK(p >= 0 && p < m, "{}: positions[{}, {}] = {} is out of range [0, {}) (or -1 for a dropped copy)", op,
                n, j, p, m);
      ++kept;
      if (!permutation) continue;
      MOE_CHECK(!seen[p], "{}: positions[{}, {}] = {} repeats an earlier copy's row; positions must be a permutation of [0, {})",
                op, n, j, p, m);
      seen[p] = 1;
    }
  MOE_CHECK(!permutation || kept == m, "{}: positions keep {} copies but the buffer has {} rows; they must be equal", op,
            kept, m);
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
// the stable (n, k) order inside each expert falls out of a single forward pass. Dropped copies
// (expert -1) get position -1.
void moe_plan(const Tensor& experts, int num_experts, const Tensor& positions, const Tensor& offsets) {
  const int64_t m = experts.numel();
  const int32_t* pe = experts.data<int32_t>();
  for (int64_t i = 0; i < m; ++i)
    MOE_CHECK(pe[i] >= -1 && pe[i] < num_experts, "moe_plan: experts[{}, {}] = {} is out of range [0, {}) (or -1 for a dropped copy)",
              i / experts.dim(1), i % experts.dim(1), pe[i], num_experts);
  int32_t* pp = positions.data<int32_t>();
  int64_t* po = offsets.data<int64_t>();
  for (int e = 0; e <= num_experts; ++e) po[e] = 0;
  for (int64_t i = 0; i < m; ++i)
    if (pe[i] >= 0) ++po[pe[i] + 1];
  for (int e = 0; e < num_experts; ++e) po[e + 1] += po[e];
  std::vector<int64_t> cursor(po, po + num_experts);
  for (int64_t i = 0; i < m; ++i) pp[i] = pe[i] >= 0 ? static_cast<int32_t>(cursor[pe[i]]++) : -1;
}

void moe_apply_capacity(const Tensor& experts, int64_t capacity, const Tensor& base, const Tensor& dispatch) {
  const int64_t n_rows = experts.dim(0), k = experts.dim(1), num_experts = base.dim(1);
  check_expert_ids("moe_apply_capacity", experts, num_experts);
  const int32_t* pe = experts.data<int32_t>();
  const int64_t* pb = base.data<int64_t>();
  int32_t* pd = dispatch.data<int32_t>();
  std::vector<int64_t> rank(static_cast<size_t>(num_experts));
  for (int64_t j = 0; j < k; ++j) {  // priority order: slot j, then row n
    std::copy_n(pb + j * num_experts, num_experts, rank.begin());
    for (int64_t n = 0; n < n_rows; ++n) {
      const int32_t e = pe[n * k + j];
      pd[n * k + j] = rank[static_cast<size_t>(e)]++ < capacity ? e : -1;
    }
  }
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
      if (pp[n * k + j] >= 0) std::memcpy(po + static_cast<int64_t>(pp[n * k + j]) * c, px + n * c, sizeof(float) * c);
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
    std::memset(dst, 0, sizeof(float) * c);
    for (int64_t j = 0; j < k; ++j) {
      if (pp[n * k + j] < 0) continue;
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
    std::memset(dst, 0, sizeof(float) * c);
    for (int64_t j = 0; j < k; ++j) {
      if (pp[n * k + j] < 0) continue;
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
      if (row < 0) {
        pdw[n * k + j] = 0.0f;
        continue;
      }
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
