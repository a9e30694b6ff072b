// Tests the bf16 paths of the CUDA ops (the dtype contract of runtime/ops.h): every op with bf16
// tensors, and each mixed f32/bf16 combination the contract allows, on CUDA against the CPU op
// run on the same bf16 inputs. Outputs are poisoned with NaN; results agree to a normwise
// relative error of kBF16Tol (both sides compute in f32 and round once per stored element, so
// they differ by reassociation and at most an ulp of bf16 per element); casts are exact.
// Sizes are odd and not multiples of any tile or vector width, so the 16-byte vector paths'
// scalar tails and the scalar fallbacks (rows not a multiple of 8 elements, misaligned views)
// run too.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "runtime/cuda/kernels.h"
#include "runtime/half.h"
#include "tests/gpu/gpu_testing.h"
#include "tests/testing.h"

namespace moeforge {
namespace {

using namespace gpu_testing;
using testing::random_ints;
using testing::random_tensor;

constexpr DType kF32 = DType::kF32;
constexpr DType kBF16 = DType::kBF16;

// A random CPU tensor of the given dtype (bf16: the f32 values rounded).
Tensor rnd(const Shape& s, uint64_t seed, DType dtype, float scale = 1.0f) {
  return random_tensor(s, seed, scale).to(dtype);
}

std::string dt(DType d) { return dtype_name(d); }

// got (a device tensor) has `dtype` and the CPU result's values to kBF16Tol.
#define EXPECT_BF16_CLOSE(got, want)                                                   \
  do {                                                                                 \
    EXPECT_EQ((got).dtype(), (want).dtype()) << #got " has the wrong dtype";          \
    EXPECT_GPU_CLOSE((got), (want), kBF16Tol);                                         \
  } while (0)

// Bitwise equality of two tensors of the same dtype (any device).
void expect_same_bits(const Tensor& got_any, const Tensor& want_cpu, const std::string& what) {
  const Tensor got = to_cpu(got_any);
  ASSERT_EQ(got.dtype(), want_cpu.dtype()) << what;
  ASSERT_EQ(got.numel(), want_cpu.numel()) << what;
  EXPECT_EQ(0, std::memcmp(got.raw_data(), want_cpu.raw_data(), want_cpu.nbytes())) << what << ": bits differ";
}

// Equal values element by element, NaN where the other has NaN (the NaN payload may differ:
// the device's cvt.rn.bf16.f32 gives the canonical NaN, runtime/half.h keeps the payload).
void expect_same_values(const Tensor& got_any, const Tensor& want_cpu, const std::string& what) {
  const Tensor got_t = to_cpu(got_any);
  ASSERT_EQ(got_t.dtype(), want_cpu.dtype()) << what;
  const std::vector<float> got = got_t.to_floats(), want = want_cpu.to_floats();
  ASSERT_EQ(got.size(), want.size()) << what;
  for (size_t i = 0; i < got.size(); ++i) {
    if (std::isnan(want[i])) {
      EXPECT_TRUE(std::isnan(got[i])) << what << ": NaN must stay NaN at " << i;
    } else {
      EXPECT_EQ(got[i], want[i]) << what << " at " << i;
    }
  }
}

// ---- cast ------------------------------------------------------------------------------------

TEST(GpuBf16, CastRoundsToNearestEvenKeepsNanAndIsExact) {
  MOE_REQUIRE_GPU();
  for (const int64_t n : {1, 7, 8, 1001, 4099}) {
    SCOPED_TRACE("n=" + std::to_string(n));
    Tensor src = random_tensor({n}, 30 + n, 3.0f);
    float* p = src.data<float>();
    // Specials and ties: NaN, +-Inf, the largest finite, a tie that rounds down to even
    // (1 + 2^-8) and one that rounds up (1 + 3 * 2^-8), a subnormal.
    const float specials[] = {std::numeric_limits<float>::quiet_NaN(), INFINITY, -INFINITY,
                              std::numeric_limits<float>::max(), 1.00390625f, 1.01171875f, 1e-40f};
    for (int64_t i = 0; i < n && i < 7; ++i) p[i] = specials[i];
    // The reference: runtime/half.h's scalar round-to-nearest-even.
    Tensor want16 = Tensor::empty({n}, kBF16);
    for (int64_t i = 0; i < n; ++i) want16.data<bf16>()[i] = to_bf16(p[i]);
    const Tensor g16 = poisoned({n}, kBF16);
    ops::cast(to_gpu(src), g16);
    expect_same_values(g16, want16, "f32 -> bf16");
    const std::vector<float> want = want16.to_floats();
    // bf16 -> f32 widens exactly; bf16 -> bf16 and f32 -> f32 copy bit for bit.
    const Tensor g32 = poisoned({n}, kF32);
    ops::cast(g16, g32);
    const std::vector<float> back = to_cpu(g32).to_floats();
    for (int64_t i = 0; i < n; ++i) {
      if (!std::isnan(want[i])) {
        EXPECT_EQ(back[i], want[i]) << "bf16 -> f32 at " << i;
      }
    }
    const Tensor g16b = poisoned({n}, kBF16), g32b = poisoned({n}, kF32);
    ops::cast(g16, g16b);
    ops::cast(to_gpu(src), g32b);
    expect_same_bits(g16b, to_cpu(g16), "bf16 -> bf16");
    expect_same_bits(g32b, src, "f32 -> f32");
    // The CPU op agrees with the CUDA one.
    Tensor cpu16 = Tensor::empty({n}, kBF16);
    ops::cast(src, cpu16);
    expect_same_values(g16, cpu16, "CUDA vs CPU f32 -> bf16");
  }
}

TEST(GpuBf16, CastOfAMisalignedViewTakesTheScalarPath) {
  MOE_REQUIRE_GPU();
  const int64_t n = 300;
  const Tensor src = random_tensor({n + 1}, 31);
  const Tensor gsrc = to_gpu(src).rows(1, n + 1);  // 4 bytes past a 16-byte boundary
  const Tensor g16 = poisoned({n + 1}, kBF16);
  ops::cast(gsrc, g16.rows(1, n + 1));
  Tensor want = Tensor::empty({n}, kBF16);
  ops::cast(src.rows(1, n + 1), want);
  expect_same_bits(to_cpu(g16).rows(1, n + 1).clone(), want, "misaligned f32 -> bf16");
}

// ---- elementwise -----------------------------------------------------------------------------

TEST(GpuBf16, FillAddScaleSumSquares) {
  MOE_REQUIRE_GPU();
  for (const int64_t n : {1, 8, 13, 1003, 70001}) {
    SCOPED_TRACE("n=" + std::to_string(n));
    const Tensor a = rnd({n}, 40, kBF16), b = rnd({n}, 41, kBF16);
    Tensor out = Tensor::empty({n}, kBF16);
    ops::add(a, b, out);
    const Tensor gout = poisoned({n}, kBF16);
    ops::add(to_gpu(a), to_gpu(b), gout);
    EXPECT_BF16_CLOSE(gout, out);

    Tensor s = a.clone();
    ops::scale_(s, -0.37f);
    const Tensor gs = to_gpu(a);
    ops::scale_(gs, -0.37f);
    EXPECT_BF16_CLOSE(gs, s);

    // Sums of squares of the same bf16 values, in double on both sides.
    const double want = ops::sum_squares(a), got = ops::sum_squares(to_gpu(a));
    EXPECT_NEAR(got, want, 1e-9 * want);

    const Tensor gf = poisoned({n}, kBF16);
    ops::fill(gf, 0.3f);
    Tensor f = Tensor::empty({n}, kBF16);
    ops::fill(f, 0.3f);
    expect_same_bits(gf, f, "fill(bf16, 0.3)");
  }
}

TEST(GpuBf16, AddInPlaceEveryDtypeCombination) {
  MOE_REQUIRE_GPU();
  for (const int64_t n : {1, 9, 1003})
    for (const DType dd : {kF32, kBF16})
      for (const DType sd : {kF32, kBF16}) {
        SCOPED_TRACE("n=" + std::to_string(n) + " dst " + dt(dd) + " src " + dt(sd));
        Tensor dst = rnd({n}, 42, dd);
        const Tensor src = rnd({n}, 43, sd);
        const Tensor gdst = to_gpu(dst);
        ops::add_(dst, src, 0.75f);
        ops::add_(gdst, to_gpu(src), 0.75f);
        EXPECT_BF16_CLOSE(gdst, dst);
      }
}

TEST(GpuBf16, ElementwiseOnMisalignedViews) {
  MOE_REQUIRE_GPU();
  const int64_t n = 517;
  const Tensor a = rnd({n + 1}, 44, kBF16), b = rnd({n + 1}, 45, kBF16);
  Tensor out = Tensor::empty({n}, kBF16);
  ops::add(a.rows(1, n + 1), b.rows(1, n + 1), out);
  const Tensor gout = poisoned({n + 1}, kBF16);
  ops::add(to_gpu(a).rows(1, n + 1), to_gpu(b).rows(1, n + 1), gout.rows(1, n + 1));
  EXPECT_BF16_CLOSE(to_cpu(gout).rows(1, n + 1).clone(), out);
}

// ---- matrix products -------------------------------------------------------------------------

TEST(GpuBf16, GemmBf16IntoBf16AndF32WithAccumulate) {
  MOE_REQUIRE_GPU();
  const int64_t m = 67, n = 45, k = 129;
  for (const bool ta : {false, true})
    for (const bool tb : {false, true})
      for (const DType cd : {kF32, kBF16}) {
        SCOPED_TRACE("ta=" + std::to_string(ta) + " tb=" + std::to_string(tb) + " c " + dt(cd));
        const Tensor a = rnd(ta ? Shape{k, m} : Shape{m, k}, 50, kBF16);
        const Tensor b = rnd(tb ? Shape{n, k} : Shape{k, n}, 51, kBF16);
        Tensor c = Tensor::empty({m, n}, cd);
        ops::gemm(a, ta, b, tb, c);
        const Tensor gc = poisoned({m, n}, cd);
        ops::gemm(to_gpu(a), ta, to_gpu(b), tb, gc);
        EXPECT_BF16_CLOSE(gc, c);
        // accumulate reads c in its dtype
        Tensor c2 = rnd({m, n}, 52, cd);
        const Tensor gc2 = to_gpu(c2);
        ops::gemm(a, ta, b, tb, c2, true, 0.5f);
        ops::gemm(to_gpu(a), ta, to_gpu(b), tb, gc2, true, 0.5f);
        EXPECT_BF16_CLOSE(gc2, c2);
      }
}

TEST(GpuBf16, GroupedGemmForwardAndBackwardWithF32OrBf16Dw) {
  MOE_REQUIRE_GPU();
  const int64_t cin = 72, cout = 100;  // cout not a multiple of the 64-wide tile
  const std::vector<int64_t> rows = {0, 130, 1, 64, 0, 7};
  const int64_t e = static_cast<int64_t>(rows.size());
  Tensor offsets = Tensor::empty({e + 1}, DType::kI64);
  offsets.data<int64_t>()[0] = 0;
  for (int64_t i = 0; i < e; ++i) offsets.data<int64_t>()[i + 1] = offsets.data<int64_t>()[i] + rows[i];
  const int64_t m = offsets.data<int64_t>()[e];
  const Tensor x = rnd({m, cin}, 53, kBF16), w = rnd({e, cout, cin}, 54, kBF16);
  Tensor out = Tensor::empty({m, cout}, kBF16);
  ops::grouped_gemm_fwd(x, w, offsets, out);
  const Tensor gx = to_gpu(x), gw = to_gpu(w), goff = to_gpu(offsets), gout = poisoned({m, cout}, kBF16);
  ops::grouped_gemm_fwd(gx, gw, goff, gout);
  EXPECT_BF16_CLOSE(gout, out);

  const Tensor dout = rnd({m, cout}, 55, kBF16);
  for (const DType dwd : {kF32, kBF16}) {
    SCOPED_TRACE("dw " + dt(dwd));
    Tensor dx = Tensor::empty({m, cin}, kBF16), dw = rnd({e, cout, cin}, 56, dwd);
    const Tensor gdx = poisoned({m, cin}, kBF16), gdw = to_gpu(dw);
    ops::grouped_gemm_bwd(x, w, offsets, dout, dx, dw);
    ops::grouped_gemm_bwd(gx, gw, goff, to_gpu(dout), gdx, gdw);
    EXPECT_BF16_CLOSE(gdx, dx);
    EXPECT_BF16_CLOSE(gdw, dw);
  }
}

// ---- dense per-token ops ---------------------------------------------------------------------

TEST(GpuBf16, EmbeddingEveryDtypeCombination) {
  MOE_REQUIRE_GPU();
  const int64_t n = 301, v = 97;
  const Tensor ids = random_ints({n}, 60, 0, v);
  for (const int64_t c : {65, 64})  // 64: the 8-wide vector path; 65: scalar rows
    for (const DType td : {kF32, kBF16})
      for (const DType od : {kF32, kBF16}) {
        SCOPED_TRACE("c=" + std::to_string(c) + " table " + dt(td) + " out " + dt(od));
        const Tensor table = rnd({v, c}, 61, td);
        Tensor out = Tensor::empty({n, c}, od);
        ops::embedding_fwd(ids, table, out);
        const Tensor gout = poisoned({n, c}, od);
        ops::embedding_fwd(to_gpu(ids), to_gpu(table), gout);
        EXPECT_BF16_CLOSE(gout, out);
      }
  for (const DType gd : {kF32, kBF16})
    for (const DType wd : {kF32, kBF16}) {
      if (gd == kF32 && wd == kBF16) continue;  // not in the contract: dtable f32 or dout's dtype
      SCOPED_TRACE("dout " + dt(gd) + " dtable " + dt(wd));
      const int64_t c = 33;
      const Tensor dout = rnd({n, c}, 62, gd);
      Tensor dtable = rnd({v, c}, 63, wd);
      const Tensor gdtable = to_gpu(dtable);
      ops::embedding_bwd(ids, dout, dtable);
      ops::embedding_bwd(to_gpu(ids), to_gpu(dout), gdtable);
      EXPECT_BF16_CLOSE(gdtable, dtable);
    }
}

TEST(GpuBf16, RmsnormEveryWeightAndGradDtype) {
  MOE_REQUIRE_GPU();
  // c = 1000 and 64: 16-byte (8 x bf16) rows; c = 33: scalar rows.
  for (const auto& [n, c] : {std::pair<int64_t, int64_t>{7, 33}, {300, 1000}, {3, 64}})
    for (const DType wd : {kF32, kBF16})
      for (const DType dwd : {kF32, kBF16}) {
        SCOPED_TRACE("n=" + std::to_string(n) + " c=" + std::to_string(c) + " w " + dt(wd) + " dw " + dt(dwd));
        const Tensor x = rnd({n, c}, 64, kBF16), w = rnd({c}, 65, wd);
        Tensor out = Tensor::empty({n, c}, kBF16), rstd = Tensor::empty({n}, kF32);
        ops::rmsnorm_fwd(x, w, 1e-5f, out, rstd);
        const Tensor gx = to_gpu(x), gw = to_gpu(w), gout = poisoned({n, c}, kBF16), grstd = poisoned({n});
        ops::rmsnorm_fwd(gx, gw, 1e-5f, gout, grstd);
        EXPECT_BF16_CLOSE(gout, out);
        EXPECT_GPU_CLOSE(grstd, rstd, kF32Tol);  // f32 statistics of the same bf16 inputs

        const Tensor dout = rnd({n, c}, 66, kBF16);
        Tensor dx = Tensor::empty({n, c}, kBF16), dw = rnd({c}, 67, dwd);
        const Tensor gdx = poisoned({n, c}, kBF16), gdw = to_gpu(dw);
        ops::rmsnorm_bwd(x, w, rstd, dout, dx, dw);
        ops::rmsnorm_bwd(gx, gw, grstd, to_gpu(dout), gdx, gdw);
        EXPECT_BF16_CLOSE(gdx, dx);
        EXPECT_BF16_CLOSE(gdw, dw);
      }
}

TEST(GpuBf16, RopeForwardAndInPlaceBackward) {
  MOE_REQUIRE_GPU();
  const Tensor x = rnd({2, 37, 3, 64}, 68, kBF16);
  Tensor out = Tensor::empty(x.shape(), kBF16);
  ops::rope_fwd(x, 10000.0f, out);
  const Tensor gout = poisoned(x.shape(), kBF16);
  ops::rope_fwd(to_gpu(x), 10000.0f, gout);
  EXPECT_BF16_CLOSE(gout, out);
  Tensor dx = Tensor::empty(x.shape(), kBF16);
  ops::rope_bwd(x, 500000.0f, dx);
  const Tensor g = to_gpu(x);
  ops::rope_bwd(g, 500000.0f, g);  // dx may alias dout
  EXPECT_BF16_CLOSE(g, dx);
}

TEST(GpuBf16, SwigluForwardAndBackwardWithTails) {
  MOE_REQUIRE_GPU();
  for (const Shape& s : {Shape{129, 77}, Shape{3, 8}, Shape{1, 1}}) {
    SCOPED_TRACE(s.str());
    const Tensor gate = rnd(s, 69, kBF16, 8.0f), up = rnd(s, 70, kBF16), dout = rnd(s, 71, kBF16);
    Tensor out = Tensor::empty(s, kBF16), dg = Tensor::empty(s, kBF16), du = Tensor::empty(s, kBF16);
    ops::swiglu_fwd(gate, up, out);
    ops::swiglu_bwd(gate, up, dout, dg, du);
    const Tensor gout = poisoned(s, kBF16), gdg = poisoned(s, kBF16), gdu = poisoned(s, kBF16);
    ops::swiglu_fwd(to_gpu(gate), to_gpu(up), gout);
    ops::swiglu_bwd(to_gpu(gate), to_gpu(up), to_gpu(dout), gdg, gdu);
    EXPECT_BF16_CLOSE(gout, out);
    EXPECT_BF16_CLOSE(gdg, dg);
    EXPECT_BF16_CLOSE(gdu, du);
  }
}

TEST(GpuBf16, CrossEntropyBf16LogitsF32Statistics) {
  MOE_REQUIRE_GPU();
  // v = 4096 and 1000: the 16-byte (8 x bf16) row paths; 1001 and 50257: scalar rows.
  for (const auto& [n, v] : {std::pair<int64_t, int64_t>{1, 1}, {33, 1001}, {8, 50257}, {17, 4096}, {5, 1000}}) {
    SCOPED_TRACE("n=" + std::to_string(n) + " v=" + std::to_string(v));
    const Tensor logits = rnd({n, v}, 72, kBF16, 6.0f);
    Tensor targets = random_ints({n}, 73, 0, static_cast<int32_t>(v));
    if (n > 2) targets.data<int32_t>()[1] = -1;
    Tensor losses = Tensor::empty({n}, kF32), lse = Tensor::empty({n}, kF32);
    ops::cross_entropy_fwd(logits, targets, losses, lse);
    const Tensor gl = to_gpu(logits), gt = to_gpu(targets), glosses = poisoned({n}), glse = poisoned({n});
    ops::cross_entropy_fwd(gl, gt, glosses, glse);
    // f32 statistics of the same bf16 logits: as close as the fp32 path.
    EXPECT_GPU_CLOSE(glosses, losses, kF32Tol);
    EXPECT_GPU_CLOSE(glse, lse, kF32Tol);

    Tensor dlogits = Tensor::empty({n, v}, kBF16);
    ops::cross_entropy_bwd(logits, targets, lse, 0.125f, dlogits);
    ops::cross_entropy_bwd(gl, gt, glse, 0.125f, gl);  // in place over the bf16 logits
    EXPECT_BF16_CLOSE(gl, dlogits);
  }
}

TEST(GpuBf16, CrossEntropyVocabParallelWithBf16Shards) {
  MOE_REQUIRE_GPU();
  const int64_t n = 19, vl = 40, vocab = 70;
  const Tensor targets = random_ints({n}, 74, -1, vocab);
  Tensor partials = Tensor::empty({2, n, 3}, kF32);
  const Tensor gpartials = poisoned({2, n, 3});
  std::vector<Tensor> shards;
  for (int r = 0; r < 2; ++r) {
    shards.push_back(rnd({n, vl}, 75 + r, kBF16, 4.0f));
    const int64_t valid = r == 0 ? vl : vocab - vl;
    ops::cross_entropy_partial_fwd(shards[r], targets, r * vl, valid, partials.rows(r, r + 1).reshape({n, 3}));
    ops::cross_entropy_partial_fwd(to_gpu(shards[r]), to_gpu(targets), r * vl, valid,
                                   gpartials.rows(r, r + 1).reshape({n, 3}));
  }
  EXPECT_GPU_CLOSE(gpartials, partials, kF32Tol);
  Tensor losses = Tensor::empty({n}, kF32), lse = Tensor::empty({n}, kF32);
  ops::cross_entropy_combine(partials, targets, vocab, losses, lse);
  Tensor d = Tensor::empty({n, vl}, kBF16);
  ops::cross_entropy_bwd(shards[1], targets, lse, 1.0f, d, vl, vocab - vl);
  const Tensor gd = poisoned({n, vl}, kBF16);
  ops::cross_entropy_bwd(to_gpu(shards[1]), to_gpu(targets), to_gpu(lse), 1.0f, gd, vl, vocab - vl);
  EXPECT_BF16_CLOSE(gd, d);
}

// ---- attention: the catalog's bf16 path reaches the fused flash kernel -------------------------

TEST(GpuBf16, AttentionThroughTheCatalogMatchesTheCpuBf16Op) {
  MOE_REQUIRE_GPU();
  const int64_t b = 2, t = 77, h = 4, hkv = 2, d = 64;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  const Tensor q = rnd({b, t, h, d}, 80, kBF16), k = rnd({b, t, hkv, d}, 81, kBF16), v = rnd({b, t, hkv, d}, 82, kBF16);
  Tensor out = Tensor::empty({b, t, h, d}, kBF16), lse = Tensor::empty({b, h, t}, kF32);
  ops::attention_fwd(q, k, v, scale, out, lse);
  const Tensor gq = to_gpu(q), gk = to_gpu(k), gv = to_gpu(v);
  const Tensor gout = poisoned({b, t, h, d}, kBF16), glse = poisoned({b, h, t});
  ops::attention_fwd(gq, gk, gv, scale, gout, glse);
  EXPECT_BF16_CLOSE(gout, out);
  EXPECT_GPU_CLOSE(glse, lse, kBF16Tol);

  const Tensor dout = rnd({b, t, h, d}, 83, kBF16);
  Tensor dq = Tensor::empty(q.shape(), kBF16), dk = Tensor::empty(k.shape(), kBF16);
  Tensor dv = Tensor::empty(v.shape(), kBF16);
  ops::attention_bwd(q, k, v, out, lse, dout, scale, dq, dk, dv);
  const Tensor gdq = poisoned(q.shape(), kBF16), gdk = poisoned(k.shape(), kBF16), gdv = poisoned(v.shape(), kBF16);
  ops::attention_bwd(gq, gk, gv, gout, glse, to_gpu(dout), scale, gdq, gdk, gdv);
  EXPECT_BF16_CLOSE(gdq, dq);
  EXPECT_BF16_CLOSE(gdk, dk);
  EXPECT_BF16_CLOSE(gdv, dv);
}

// Masks through the catalog: the window alone (dense kernels), documents (packed kernels on the
// flattened rows, lse repacked for B > 1, a view for B = 1), both; against the CPU bf16 op with
// the same mask. The f32 CUDA kernel refuses a mask.
TEST(GpuBf16, MaskedAttentionThroughTheCatalogMatchesTheCpuBf16Op) {
  MOE_REQUIRE_GPU();
  struct Case {
    int64_t b, t, window;
    std::vector<int32_t> cu;  // empty: no documents
  };
  for (const Case& c : std::vector<Case>{{2, 77, 20, {}},
                                        {2, 77, 0, {0, 30, 31, 77, 140, 154}},
                                        {1, 130, 0, {0, 64, 65, 130}},
                                        {2, 100, 33, {0, 70, 100, 101, 200}}}) {
    SCOPED_TRACE(::testing::Message() << "B " << c.b << " T " << c.t << " window " << c.window << " documents "
                                      << (c.cu.empty() ? 0 : c.cu.size() - 1));
    const int64_t h = 4, hkv = 2, d = 64;
    const float scale = 1.0f / std::sqrt(static_cast<float>(d));
    ops::AttentionMask mask;
    mask.window = c.window;
    if (!c.cu.empty()) {
      mask.cu_seqlens = Tensor::from_ints({std::ssize(c.cu)}, c.cu);
      for (size_t i = 0; i + 1 < c.cu.size(); ++i) mask.max_seqlen = std::max<int64_t>(mask.max_seqlen, c.cu[i + 1] - c.cu[i]);
    }
    ops::AttentionMask gmask = mask;
    if (mask.cu_seqlens.defined()) gmask.cu_seqlens = to_gpu(mask.cu_seqlens);
    const Tensor q = rnd({c.b, c.t, h, d}, 90, kBF16), k = rnd({c.b, c.t, hkv, d}, 91, kBF16),
                 v = rnd({c.b, c.t, hkv, d}, 92, kBF16), dout = rnd({c.b, c.t, h, d}, 93, kBF16);
    Tensor out = Tensor::empty(q.shape(), kBF16), lse = Tensor::empty({c.b, h, c.t}, kF32);
    ops::attention_fwd(q, k, v, scale, out, lse, mask);
    const Tensor gq = to_gpu(q), gk = to_gpu(k), gv = to_gpu(v);
    const Tensor gout = poisoned(q.shape(), kBF16), glse = poisoned({c.b, h, c.t});
    ops::attention_fwd(gq, gk, gv, scale, gout, glse, gmask);
    EXPECT_BF16_CLOSE(gout, out);
    EXPECT_GPU_CLOSE(glse, lse, kBF16Tol);
    Tensor dq = Tensor::empty(q.shape(), kBF16), dk = Tensor::empty(k.shape(), kBF16), dv = Tensor::empty(v.shape(), kBF16);
    ops::attention_bwd(q, k, v, out, lse, dout, scale, dq, dk, dv, mask);
    const Tensor gdq = poisoned(q.shape(), kBF16), gdk = poisoned(k.shape(), kBF16), gdv = poisoned(v.shape(), kBF16);
    ops::attention_bwd(gq, gk, gv, gout, glse, to_gpu(dout), scale, gdq, gdk, gdv, gmask);
    EXPECT_BF16_CLOSE(gdq, dq);
    EXPECT_BF16_CLOSE(gdk, dk);
    EXPECT_BF16_CLOSE(gdv, dv);
  }
  ops::AttentionMask window;
  window.window = 8;
  const Tensor q32 = to_gpu(random_tensor({1, 16, 2, 64}, 94)), k32 = to_gpu(random_tensor({1, 16, 2, 64}, 95));
  EXPECT_EQ(testing::error_of([&] {
              ops::attention_fwd(q32, k32, k32, 0.1f, poisoned(q32.shape()), poisoned({1, 2, 16}), window);
            }),
            "attention_fwd: the f32 CUDA attention takes plain causal attention only; a window or packed documents "
            "run on the fused bf16 kernels (train.precision: BF16)");
}

// ---- permutation -----------------------------------------------------------------------------

TEST(GpuBf16, PermuteAndUnpermuteBothWays) {
  MOE_REQUIRE_GPU();
  // c = 130: scalar rows; c = 256: 16-byte (8 x bf16) rows; c = 8: one vector per row.
  for (const int64_t c : {130, 256, 8})
    for (const int64_t k : {1, 2, 8}) {
      const int64_t n = 257;
      const int e = 9;
      SCOPED_TRACE("C=" + std::to_string(c) + " k=" + std::to_string(k));
      const DroppingPlan plan = dropping_plan(n, k, e, 90 + k);
      const Tensor& positions = plan.positions;
      const int64_t m = plan.m;
      const Tensor gpos = to_gpu(positions);

      const Tensor x = rnd({n, c}, 91, kBF16);
      Tensor px = Tensor::empty({m, c}, kBF16);
      ops::moe_permute_fwd(x, positions, px);
      const Tensor gpx = poisoned({m, c}, kBF16);
      ops::moe_permute_fwd(to_gpu(x), gpos, gpx);
      expect_same_bits(gpx, px, "permute_fwd moves bf16 rows unchanged");

      const Tensor dpx = rnd({m, c}, 92, kBF16);
      Tensor dx = Tensor::empty({n, c}, kBF16);
      ops::moe_permute_bwd(dpx, positions, dx);
      const Tensor gdx = poisoned({n, c}, kBF16);
      ops::moe_permute_bwd(to_gpu(dpx), gpos, gdx);
      EXPECT_BF16_CLOSE(gdx, dx);

      const Tensor y = rnd({m, c}, 93, kBF16), weights = random_tensor({n, k}, 94);
      Tensor out = Tensor::empty({n, c}, kBF16);
      ops::moe_unpermute_fwd(y, positions, weights, out);
      const Tensor gout = poisoned({n, c}, kBF16);
      ops::moe_unpermute_fwd(to_gpu(y), gpos, to_gpu(weights), gout);
      EXPECT_BF16_CLOSE(gout, out);

      const Tensor dout = rnd({n, c}, 95, kBF16);
      Tensor dy = Tensor::empty({m, c}, kBF16), dw = Tensor::empty({n, k}, kF32);
      ops::moe_unpermute_bwd(y, positions, weights, dout, dy, dw);
      const Tensor gdy = poisoned({m, c}, kBF16), gdw = poisoned({n, k});
      ops::moe_unpermute_bwd(to_gpu(y), gpos, to_gpu(weights), to_gpu(dout), gdy, gdw);
      EXPECT_BF16_CLOSE(gdy, dy);
      EXPECT_GPU_CLOSE(gdw, dw, kBF16Tol);
    }
}

// ---- the Tensor-level CUDA ops reject what they do not implement -------------------------------

TEST(GpuBf16, CudaOpsRejectF16ClearlyEvenPastTheCatalog) {
  MOE_REQUIRE_GPU();
  const Tensor h = Tensor::empty({4}, DType::kF16, gpu());
  EXPECT_THROW(cuda::scale_(h, 2.0f), Error);
  EXPECT_THROW(cuda::add(h, h, h), Error);
  const Tensor a = Tensor::empty({4}, kBF16, gpu()), f = Tensor::empty({4}, kF32, gpu());
  EXPECT_THROW(cuda::add(a, f, a), Error);
}

}  // namespace
}  // namespace moeforge
