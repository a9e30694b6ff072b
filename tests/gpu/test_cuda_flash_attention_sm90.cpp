// Tests the Hopper attention kernels (runtime/cuda/flash_attention_sm90*.cu: wgmma + TMA,
// sm_90a), forced with MOEFORGE_ATTENTION_KERNEL=wgmma: forward and backward through the op
// catalog against the CPU op on the same bf16-rounded inputs (T not a multiple of the tiles, GQA
// ratios 1, 4 and 8, head dims 64 and 128) and against the mma.sync kernels on the same inputs,
// and, called directly, the sliding window and packed variable-length sequences against a naive
// double reference. Outputs poisoned with NaN; bf16 outputs to 1e-2 normwise, lse to 1e-4; the
// backward is bitwise deterministic. Skips, saying why, unless the device has compute capability
// 9.0 and the kernels were built (90 among CMAKE_CUDA_ARCHITECTURES); on another GPU it checks
// that forcing them is an error.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#include "runtime/cuda/device.h"
#include "runtime/cuda/kernels.h"
#include "tests/gpu/gpu_testing.h"
#include "tests/testing.h"

namespace moeforge {
namespace {

using namespace gpu_testing;
using testing::random_tensor;

bool is_sm90() {
  const cuda::DeviceContext& c = cuda::context(0);
  return c.cc_major == 9 && c.cc_minor == 0;
}

#if MOEFORGE_WITH_SM90_ATTENTION
constexpr bool kBuilt = true;
#else
constexpr bool kBuilt = false;
#endif

#define MOE_REQUIRE_SM90()                                                                                   \
  do {                                                                                                       \
    MOE_REQUIRE_GPU();                                                                                       \
    if (!is_sm90())                                                                                          \
      GTEST_SKIP() << "the wgmma attention runs on compute capability 9.0 (H100/H200); this device has "     \
                   << cuda::context(0).cc_major << "." << cuda::context(0).cc_minor;                         \
    if (!kBuilt)                                                                                             \
      GTEST_SKIP() << "the wgmma attention was not built: configure with 90 among CMAKE_CUDA_ARCHITECTURES"; \
  } while (0)

using Case = AttentionCase;

TEST(GpuFlashAttentionSm90, CatalogOpsMatchTheCpu) {
  MOE_REQUIRE_SM90();
  for (const Case c :
       {Case{1, 1, 1, 1, 64}, Case{2, 77, 4, 4, 64}, Case{2, 200, 8, 2, 64}, Case{1, 300, 8, 1, 64},
        Case{1, 130, 4, 1, 128}, Case{2, 257, 4, 4, 128}, Case{1, 383, 8, 2, 128}, Case{1, 640, 8, 1, 128}}) {
    const AttentionReference ref = cpu_attention(c, 11);
    const Shape &qs = ref.qs, &ks = ref.ks, &ls = ref.ls;
    const float scale = ref.scale;
    const Tensor &q = ref.q, &k = ref.k, &v = ref.v, &dout = ref.dout;
    const Tensor &out = ref.out, &lse = ref.lse, &dq = ref.dq, &dk = ref.dk, &dv = ref.dv;

    const Tensor gq = gpu_bf16(q), gk = gpu_bf16(k), gv = gpu_bf16(v), gdout = gpu_bf16(dout);
    const Tensor gout = poisoned(qs, DType::kBF16), glse = poisoned(ls);
    const Tensor gdq = poisoned(qs, DType::kBF16), gdk = poisoned(ks, DType::kBF16), gdv = poisoned(ks, DType::kBF16);
    const Tensor rdq = poisoned(qs, DType::kBF16), rdk = poisoned(ks, DType::kBF16), rdv = poisoned(ks, DType::kBF16);
    {
      KernelChoice wgmma("wgmma");
      ops::attention_fwd(gq, gk, gv, scale, gout, glse);
      ops::attention_bwd(gq, gk, gv, gout, glse, gdout, scale, gdq, gdk, gdv);
      ops::attention_bwd(gq, gk, gv, gout, glse, gdout, scale, rdq, rdk, rdv);
    }
    const std::string at = " T=" + std::to_string(c.t) + " H=" + std::to_string(c.h) + " Hkv=" + std::to_string(c.hkv) +
                           " D=" + std::to_string(c.d);
    EXPECT_GPU_CLOSE(gout, out, kBF16Tol) << at;
    EXPECT_GPU_CLOSE(glse, lse, 1e-4) << at;
    EXPECT_GPU_CLOSE(gdq, dq, kBF16Tol) << at;
    EXPECT_GPU_CLOSE(gdk, dk, kBF16Tol) << at;
    EXPECT_GPU_CLOSE(gdv, dv, kBF16Tol) << at;
    // No atomics: a second run gives the same bits.
    expect_equal_ints(rdq, to_cpu(gdq), "wgmma dq of a second run");
    expect_equal_ints(rdk, to_cpu(gdk), "wgmma dk of a second run");
    expect_equal_ints(rdv, to_cpu(gdv), "wgmma dv of a second run");

    // The same inputs through the mma.sync kernels.
    const Tensor mout = poisoned(qs, DType::kBF16), mlse = poisoned(ls);
    const Tensor mdq = poisoned(qs, DType::kBF16), mdk = poisoned(ks, DType::kBF16), mdv = poisoned(ks, DType::kBF16);
    {
      KernelChoice mma("mma");
      ops::attention_fwd(gq, gk, gv, scale, mout, mlse);
      ops::attention_bwd(gq, gk, gv, gout, glse, gdout, scale, mdq, mdk, mdv);
    }
    const auto f32 = [](const Tensor& t) { return to_cpu(t).to(DType::kF32); };
    EXPECT_GPU_CLOSE(gout, f32(mout), kBF16Tol) << " wgmma vs mma.sync" << at;
    EXPECT_GPU_CLOSE(glse, f32(mlse), 1e-5) << " wgmma vs mma.sync" << at;
    EXPECT_GPU_CLOSE(gdq, f32(mdq), kBF16Tol) << " wgmma vs mma.sync" << at;
    EXPECT_GPU_CLOSE(gdk, f32(mdk), kBF16Tol) << " wgmma vs mma.sync" << at;
    EXPECT_GPU_CLOSE(gdv, f32(mdv), kBF16Tol) << " wgmma vs mma.sync" << at;
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

TEST(GpuFlashAttentionSm90, SlidingWindowAndPackedSequencesMatchTheReference) {
  MOE_REQUIRE_SM90();
  KernelChoice wgmma("wgmma");
  const auto check = [](const std::vector<int32_t>& cu, int64_t max_len, bool packed, int64_t d, int64_t h, int64_t w) {
    const int64_t rows = cu.back(), hkv = 2;
    // Packed: (R, H, D), lse (H, R); one dense sequence: (1, T, H, D), lse (1, H, T), the same numbers.
    const Shape qs = packed ? Shape{rows, h, d} : Shape{1, rows, h, d};
    const Shape ks = packed ? Shape{rows, hkv, d} : Shape{1, rows, hkv, d};
    const Shape ls = packed ? Shape{h, rows} : Shape{1, h, rows};
    const Tensor q = bf16_grid(qs, 21), k = bf16_grid(ks, 22), v = bf16_grid(ks, 23), dout = bf16_grid(qs, 24);
    const double scale = 1.0 / std::sqrt(static_cast<double>(d));
    const Reference r = reference(cu, h, hkv, d, w, scale, testing::to_double(q), testing::to_double(k),
                                  testing::to_double(v), testing::to_double(dout));
    const cuda::FlashOptions opt =
        packed ? cuda::FlashOptions{w, to_gpu(Tensor::from_ints({static_cast<int64_t>(cu.size())}, cu)), max_len}
               : cuda::FlashOptions{w, Tensor(), 0};
    const Tensor gq = gpu_bf16(q), gk = gpu_bf16(k), gv = gpu_bf16(v);
    const Tensor gout = poisoned(qs, DType::kBF16), glse = poisoned(ls);
    cuda::flash_attention_fwd(gq, gk, gv, static_cast<float>(scale), gout, glse, opt);
    const Tensor gdq = poisoned(qs, DType::kBF16), gdk = poisoned(ks, DType::kBF16), gdv = poisoned(ks, DType::kBF16);
    cuda::flash_attention_bwd(gq, gk, gv, gout, glse, gpu_bf16(dout), static_cast<float>(scale), gdq, gdk, gdv, opt);
    const auto want = [](const Shape& s, const std::vector<double>& x) { return testing::from_double(s, x); };
    const std::string at = std::string(packed ? " packed" : " dense") + " D=" + std::to_string(d) +
                           " H=" + std::to_string(h) + " window=" + std::to_string(w);
    EXPECT_GPU_CLOSE(gout, want(qs, r.out), kBF16Tol) << at;
    EXPECT_GPU_CLOSE(glse, want(ls, r.lse), 1e-4) << at;
    EXPECT_GPU_CLOSE(gdq, want(qs, r.dq), kBF16Tol) << at;
    EXPECT_GPU_CLOSE(gdk, want(ks, r.dk), kBF16Tol) << at;
    EXPECT_GPU_CLOSE(gdv, want(ks, r.dv), kBF16Tol) << at;
  };
  // Lengths 5, 64, 0, 100, 1, 300: tiles straddling sequence ends, an empty sequence.
  const std::vector<int32_t> cu{0, 5, 69, 69, 169, 170, 470};
  for (const int64_t d : {64, 128})
    for (const int64_t h : {2, 8})
      for (const int64_t w : {0, 1, 17, 130}) check(cu, 300, true, d, h, w);
  // Windows on one long sequence: whole tiles outside the window are skipped, others masked.
  for (const int64_t d : {64, 128})
    for (const int64_t w : {0, 64, 100, 128, 300}) check({0, 777}, 777, false, d, 4, w);
}

// Where the kernel cannot run, forcing it is an error naming the reason; an unknown choice too.
TEST(GpuFlashAttentionSm90, ForcingTheKernelWhereItCannotRunIsAnError) {
  MOE_REQUIRE_GPU();
  const Tensor q = gpu_bf16(bf16_grid({1, 8, 2, 64}, 1)), lse = poisoned({1, 2, 8});
  const Tensor out = poisoned({1, 8, 2, 64}, DType::kBF16);
  {
    KernelChoice bad("fast");
    EXPECT_EQ(testing::error_of([&] { cuda::flash_attention_fwd(q, q, q, 1.0f, out, lse); }),
              "flash_attention_fwd: MOEFORGE_ATTENTION_KERNEL is 'fast', expected mma, wgmma or cudnn (or unset)");
  }
  if (is_sm90() && kBuilt) return;  // it can run here: the tests above cover it (no skip: gpu-check counts skips)
  KernelChoice wgmma("wgmma");
  const std::string error = testing::error_of([&] { cuda::flash_attention_fwd(q, q, q, 1.0f, out, lse); });
  EXPECT_EQ(error.rfind("flash_attention_fwd: MOEFORGE_ATTENTION_KERNEL=wgmma, but the wgmma kernel cannot run: ", 0),
            0u)
      << error;
}

}  // namespace
}  // namespace moeforge
