// Tests the fused bf16 attention (runtime/cuda/flash_attention*.cu): through the op catalog
// against the CPU op on the same bf16-rounded inputs (T not a multiple of the tiles, GQA ratios
// 1, 4 and 8, head dims 64 and 128), and, called directly, the sliding window and packed
// variable-length sequences against a naive double reference written here. Outputs poisoned with
// NaN; bf16 outputs to 1e-2 normwise, lse to 1e-4; the backward is bitwise deterministic. The
// dtype check runs without a device.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "runtime/cuda/kernels.h"
#include "tests/gpu/gpu_testing.h"
#include "tests/testing.h"

namespace moeforge {
namespace {

using namespace gpu_testing;
using testing::random_tensor;

using Case = AttentionCase;

TEST(GpuFlashAttention, Bf16CatalogOpsMatchTheCpu) {
  MOE_REQUIRE_GPU();
  for (const Case c : {Case{1, 1, 1, 1, 64}, Case{2, 77, 4, 4, 64}, Case{2, 65, 4, 1, 64}, Case{1, 200, 8, 2, 128},
                       Case{1, 130, 8, 1, 128}, Case{1, 33, 2, 2, 128}}) {
    const AttentionReference ref = cpu_attention(c, 1);
    const Shape &qs = ref.qs, &ks = ref.ks, &ls = ref.ls;
    const float scale = ref.scale;
    const Tensor &q = ref.q, &k = ref.k, &v = ref.v, &dout = ref.dout;
    const Tensor &out = ref.out, &lse = ref.lse, &dq = ref.dq, &dk = ref.dk, &dv = ref.dv;

    const Tensor gq = gpu_bf16(q), gk = gpu_bf16(k), gv = gpu_bf16(v);
    const Tensor gout = poisoned(qs, DType::kBF16), glse = poisoned(ls);
    ops::attention_fwd(gq, gk, gv, scale, gout, glse);
    EXPECT_GPU_CLOSE(gout, out, kBF16Tol) << " T=" << c.t << " H=" << c.h << " Hkv=" << c.hkv << " D=" << c.d;
    EXPECT_GPU_CLOSE(glse, lse, 1e-4) << " T=" << c.t << " D=" << c.d;
    const Tensor gdq = poisoned(qs, DType::kBF16), gdk = poisoned(ks, DType::kBF16), gdv = poisoned(ks, DType::kBF16);
    ops::attention_bwd(gq, gk, gv, gout, glse, gpu_bf16(dout), scale, gdq, gdk, gdv);
    EXPECT_GPU_CLOSE(gdq, dq, kBF16Tol) << " T=" << c.t << " H=" << c.h << " Hkv=" << c.hkv << " D=" << c.d;
    EXPECT_GPU_CLOSE(gdk, dk, kBF16Tol) << " T=" << c.t << " H=" << c.h << " Hkv=" << c.hkv << " D=" << c.d;
    EXPECT_GPU_CLOSE(gdv, dv, kBF16Tol) << " T=" << c.t << " H=" << c.h << " Hkv=" << c.hkv << " D=" << c.d;
    // No atomics: a second run gives the same bits.
    const Tensor rdq = poisoned(qs, DType::kBF16), rdk = poisoned(ks, DType::kBF16), rdv = poisoned(ks, DType::kBF16);
    ops::attention_bwd(gq, gk, gv, gout, glse, gpu_bf16(dout), scale, rdq, rdk, rdv);
    expect_equal_ints(rdq, to_cpu(gdq), "dq of a second run");
    expect_equal_ints(rdk, to_cpu(gdk), "dk of a second run");
    expect_equal_ints(rdv, to_cpu(gdv), "dv of a second run");
  }
}

// Naive double attention over packed rows (R, H, D): sequences [cu[b], cu[b+1]), causal, window w.
struct Reference {
  std::vector<double> out, lse, dq, dk, dv;  // lse (H, R)
};

Reference reference(const std::vector<int32_t>& cu, int64_t h_count, int64_t hkv, int64_t d, int64_t w, double scale,
                    const std::vector<double>& q, const std::vector<double>& k, const std::vector<double>& v,
                    const std::vector<double>& dout) {
  const int64_t rows = cu.back(), group = h_count / hkv;
  Reference r{std::vector<double>(q.size()), std::vector<double>(h_count * rows), std::vector<double>(q.size()),
              std::vector<double>(k.size()), std::vector<double>(k.size())};
  const auto qi = [&](int64_t row, int64_t h) { return (row * h_count + h) * d; };
  const auto kj = [&](int64_t row, int64_t g) { return (row * hkv + g) * d; };
  for (size_t b = 0; b + 1 < cu.size(); ++b)
    for (int64_t h = 0; h < h_count; ++h) {
      const int64_t g = h / group;
      for (int64_t i = cu[b]; i < cu[b + 1]; ++i) {
        std::vector<int64_t> js;
        std::vector<double> p;
        double mx = -INFINITY;
        for (int64_t j = cu[b]; j <= i; ++j) {
          if (w > 0 && i - j >= w) continue;
          double s = 0;
          for (int64_t c = 0; c < d; ++c) s += q[qi(i, h) + c] * k[kj(j, g) + c];
          js.push_back(j);
          p.push_back(s * scale);
          mx = std::max(mx, s * scale);
        }
        double sum = 0;
        for (double& x : p) sum += (x = std::exp(x - mx));
        r.lse[h * rows + i] = mx + std::log(sum);
        for (double& x : p) x /= sum;
        std::vector<double> dp(js.size());
        double delta = 0;
        for (size_t n = 0; n < js.size(); ++n) {
          for (int64_t c = 0; c < d; ++c) {
            r.out[qi(i, h) + c] += p[n] * v[kj(js[n], g) + c];
            dp[n] += dout[qi(i, h) + c] * v[kj(js[n], g) + c];
          }
          delta += p[n] * dp[n];
        }
        for (size_t n = 0; n < js.size(); ++n) {
          const double ds = p[n] * (dp[n] - delta);
          for (int64_t c = 0; c < d; ++c) {
            r.dv[kj(js[n], g) + c] += p[n] * dout[qi(i, h) + c];
            r.dq[qi(i, h) + c] += scale * ds * k[kj(js[n], g) + c];
            r.dk[kj(js[n], g) + c] += scale * ds * q[qi(i, h) + c];
          }
        }
      }
    }
  return r;
}

TEST(GpuFlashAttention, SlidingWindowAndPackedSequencesMatchTheReference) {
  MOE_REQUIRE_GPU();
  const std::vector<int32_t> cu{0, 5, 69, 69, 169, 170};  // lengths 5, 64, 0, 100, 1
  const int64_t rows = cu.back(), max_len = 100, hkv = 2;
  for (const int64_t d : {64, 128})
    for (const int64_t h : {2, 8})
      for (const int64_t w : {0, 1, 17}) {
        const Shape qs{rows, h, d}, ks{rows, hkv, d}, ls{h, rows};
        const Tensor q = bf16_grid(qs, 5), k = bf16_grid(ks, 6), v = bf16_grid(ks, 7), dout = bf16_grid(qs, 8);
        const double scale = 1.0 / std::sqrt(static_cast<double>(d));
        const Reference r = reference(cu, h, hkv, d, w, scale, testing::to_double(q), testing::to_double(k),
                                      testing::to_double(v), testing::to_double(dout));
        const cuda::FlashOptions opt{w, to_gpu(Tensor::from_ints({static_cast<int64_t>(cu.size())}, cu)), max_len};
        const Tensor gq = gpu_bf16(q), gk = gpu_bf16(k), gv = gpu_bf16(v);
        const Tensor gout = poisoned(qs, DType::kBF16), glse = poisoned(ls);
        cuda::flash_attention_fwd(gq, gk, gv, static_cast<float>(scale), gout, glse, opt);
        const Tensor gdq = poisoned(qs, DType::kBF16), gdk = poisoned(ks, DType::kBF16),
                     gdv = poisoned(ks, DType::kBF16);
        cuda::flash_attention_bwd(gq, gk, gv, gout, glse, gpu_bf16(dout), static_cast<float>(scale), gdq, gdk, gdv,
                                  opt);
        const auto want = [](const Shape& s, const std::vector<double>& x) { return testing::from_double(s, x); };
        EXPECT_GPU_CLOSE(gout, want(qs, r.out), kBF16Tol) << " D=" << d << " H=" << h << " window=" << w;
        EXPECT_GPU_CLOSE(glse, want(ls, r.lse), 1e-4) << " D=" << d << " H=" << h << " window=" << w;
        EXPECT_GPU_CLOSE(gdq, want(qs, r.dq), kBF16Tol) << " D=" << d << " H=" << h << " window=" << w;
        EXPECT_GPU_CLOSE(gdk, want(ks, r.dk), kBF16Tol) << " D=" << d << " H=" << h << " window=" << w;
        EXPECT_GPU_CLOSE(gdv, want(ks, r.dv), kBF16Tol) << " D=" << d << " H=" << h << " window=" << w;
      }
}

TEST(GpuFlashAttention, UnsupportedHeadDimIsAnError) {
  MOE_REQUIRE_GPU();
  const Tensor q = poisoned({1, 4, 2, 80}, DType::kBF16), lse = poisoned({1, 2, 4});
  EXPECT_EQ(testing::error_of([&] { ops::attention_fwd(q, q, q, 1.0f, q, lse); }),
            "flash attention: head dim 80 is not supported (64 or 128)");
}

// bf16 attention runs on the CPU too (the dtype contract): f32 math on the widened inputs, one
// rounding per stored element. It must agree with the f32 op on the same (widened) values; the
// gpu tests above compare the CUDA kernels with it. Runs without a GPU.
TEST(GpuFlashAttention, Bf16OnTheCpuMatchesF32OnTheWidenedInputs) {
  const Shape qs{1, 9, 2, 64}, lses{1, 2, 9};
  const Tensor q = testing::random_tensor(qs, 1).to(DType::kBF16), k = testing::random_tensor(qs, 2).to(DType::kBF16);
  const Tensor v = testing::random_tensor(qs, 3).to(DType::kBF16);
  Tensor out = Tensor::empty(qs, DType::kBF16), lse = Tensor::empty(lses, DType::kF32);
  ops::attention_fwd(q, k, v, 0.125f, out, lse);
  Tensor out32 = Tensor::empty(qs, DType::kF32), lse32 = Tensor::empty(lses, DType::kF32);
  ops::attention_fwd(q.to(DType::kF32), k.to(DType::kF32), v.to(DType::kF32), 0.125f, out32, lse32);
  EXPECT_EQ(out.dtype(), DType::kBF16);
  EXPECT_LE(rel_err(out, out32), kBF16Tol);
  EXPECT_LE(rel_err(lse, lse32), kF32Tol);
}

}  // namespace
}  // namespace moeforge
