// bf16 mixed precision in the op catalog (runtime/ops.h, "Dtypes"):
//  - cast rounds to nearest even (ties, NaN, Inf, overflow) and widens exactly;
//  - every float op run with bf16 operands gives, for each bf16 output, the f32 op on the
//    widened inputs rounded once (bitwise), and for each f32 output (statistics, fp32 gradients)
//    exactly the f32 op's value; parameter-gradient outputs accumulate in f32 from bf16 operands;
//  - the bf16 results are close to the f32 op on the original (unrounded) inputs: the mixed
//    precision error of one op is about bf16's resolution (relative 2^-8);
//  - combinations outside the contract fail with errors that name op, argument and dtypes.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "runtime/half.h"
#include "runtime/ops.h"
#include "tests/testing.h"

namespace moeforge {
namespace {

using testing::error_of;
using testing::random_ints;
using testing::random_tensor;

Tensor bf16_of(const Tensor& f32) {
  Tensor t = Tensor::empty(f32.shape(), DType::kBF16);
  ops::cast(f32, t);
  return t;
}
Tensor f32_of(const Tensor& t) {
  Tensor out = Tensor::empty(t.shape(), DType::kF32);
  ops::cast(t, out);
  return out;
}
// Random values exactly representable in bf16, as f32 and as bf16.
struct Pair {
  Tensor f, b;
};
Pair pair(const Shape& shape, uint64_t seed, float scale = 1.0f) {
  const Tensor b = bf16_of(random_tensor(shape, seed, scale));
  return {f32_of(b), b};
}
Tensor bf16_empty(const Shape& s) {
  Tensor t = Tensor::empty(s, DType::kBF16);
  ops::fill(t, std::numeric_limits<float>::quiet_NaN());
  return t;
}
Tensor f32_empty(const Shape& s) {
  Tensor t = Tensor::empty(s, DType::kF32);
  ops::fill(t, std::numeric_limits<float>::quiet_NaN());
  return t;
}
// got (bf16) is exactly round(want (f32)).
void expect_rounded(const Tensor& got, const Tensor& want, const char* what) {
  ASSERT_EQ(got.dtype(), DType::kBF16) << what;
  const std::vector<float> w = want.to_floats();
  const bf16* g = got.data<bf16>();
  for (size_t i = 0; i < w.size(); ++i)
    ASSERT_EQ(g[i].bits, to_bf16(w[i]).bits) << what << " element " << i << ": want round(" << w[i] << ")";
}
void expect_equal(const Tensor& got, const Tensor& want, const char* what) {
  ASSERT_EQ(got.dtype(), DType::kF32) << what;
  EXPECT_EQ(got.to_floats(), want.to_floats()) << what;
}
// Relative norm error of a bf16 result against an f32 reference.
double rel(const Tensor& got, const Tensor& want) {
  return testing::rel_error(testing::to_double(f32_of(got)), testing::to_double(want));
}

TEST(Bf16Ops, CastRoundsToNearestEvenAndWidensExactly) {
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even (1); 1 + 3 * 2^-8 ties up to 1 + 2^-6.
  const std::vector<float> in{1.0f + 0x1p-8f, 1.0f + 3 * 0x1p-8f, -2.5f, nan, inf, -inf, 3.4e38f, 1e-40f, 0.0f};
  const Tensor f = Tensor::from_floats({static_cast<int64_t>(in.size())}, in);
  const Tensor b = bf16_of(f);
  const std::vector<float> back = f32_of(b).to_floats();
  EXPECT_EQ(back[0], 1.0f);
  EXPECT_EQ(back[1], 1.0f + 0x1p-6f);
  EXPECT_EQ(back[2], -2.5f);
  EXPECT_TRUE(std::isnan(back[3]));
  EXPECT_EQ(back[4], inf);
  EXPECT_EQ(back[5], -inf);
  EXPECT_EQ(back[6], inf);  // past bf16's largest finite value (~3.39e38)
  EXPECT_EQ(back[8], 0.0f);
  for (size_t i = 0; i < in.size(); ++i) EXPECT_EQ(b.data<bf16>()[i].bits, to_bf16(in[i]).bits) << i;
  // Widening then rounding again is the identity.
  const Tensor again = bf16_of(f32_of(b));
  for (size_t i = 0; i < in.size(); ++i) EXPECT_EQ(again.data<bf16>()[i].bits, b.data<bf16>()[i].bits) << i;
  // Same-dtype cast is a copy.
  const Tensor c = bf16_empty(b.shape());
  ops::cast(b, c);
  for (size_t i = 0; i < in.size(); ++i) EXPECT_EQ(c.data<bf16>()[i].bits, b.data<bf16>()[i].bits) << i;
}

TEST(Bf16Ops, ElementwiseAndReductions) {
  const Pair a = pair({7, 33}, 1), b = pair({7, 33}, 2);
  Tensor out = bf16_empty({7, 33}), ref = f32_empty({7, 33});
  ops::add(a.b, b.b, out);
  ops::add(a.f, b.f, ref);
  expect_rounded(out, ref, "add");
  // f32 += bf16 (fp32 accumulation of bf16 contributions) and bf16 += f32.
  Tensor acc = a.f.clone(), acc_ref = a.f.clone();
  ops::add_(acc, b.b, 0.5f);
  ops::add_(acc_ref, b.f, 0.5f);
  expect_equal(acc, acc_ref, "add_ f32 += bf16");
  Tensor accb = a.b.clone();
  ops::add_(accb, b.f, -1.5f);
  Tensor accb_ref = a.f.clone();
  ops::add_(accb_ref, b.f, -1.5f);
  expect_rounded(accb, accb_ref, "add_ bf16 += f32");
  Tensor sc = a.b.clone(), sc_ref = a.f.clone();
  ops::scale_(sc, 0.3f);
  ops::scale_(sc_ref, 0.3f);
  expect_rounded(sc, sc_ref, "scale_");
  EXPECT_EQ(ops::sum_squares(a.b), ops::sum_squares(a.f));
  Tensor filled = bf16_empty({5});
  ops::fill(filled, 1.0f / 3.0f);
  for (int i = 0; i < 5; ++i) EXPECT_EQ(filled.data<bf16>()[i].bits, to_bf16(1.0f / 3.0f).bits);
}

TEST(Bf16Ops, GemmBf16ToBf16AndToF32Accumulate) {
  const Pair a = pair({9, 40}, 3), w = pair({17, 40}, 4);
  for (const bool trans_b : {true, false}) {
    const Tensor wb = trans_b ? w.b : bf16_of(f32_of(w.b).reshape({40, 17}));
    const Tensor wf = trans_b ? w.f : f32_of(wb);
    Tensor c = bf16_empty({9, 17}), ref = f32_empty({9, 17});
    ops::gemm(a.b, false, wb, trans_b, c, false, 1.0f);
    ops::gemm(a.f, false, wf, trans_b, ref, false, 1.0f);
    expect_rounded(c, ref, "gemm bf16 -> bf16");
    // Into an f32 accumulator (weight gradients): exactly the f32 product added.
    Tensor c32 = random_tensor({9, 17}, 5), c32_ref = c32.clone();
    ops::gemm(a.b, false, wb, trans_b, c32, true, 0.5f);
    ops::gemm(a.f, false, wf, trans_b, c32_ref, true, 0.5f);
    expect_equal(c32, c32_ref, "gemm bf16 -> f32 accumulate");
  }
  // Against the product of the unrounded inputs: bf16's resolution.
  const Tensor af = random_tensor({9, 40}, 6), wf = random_tensor({17, 40}, 7);
  Tensor c = bf16_empty({9, 17}), ref = f32_empty({9, 17});
  ops::gemm(bf16_of(af), false, bf16_of(wf), true, c);
  ops::gemm(af, false, wf, true, ref);
  EXPECT_LT(rel(c, ref), 1e-2);
}

TEST(Bf16Ops, EmbeddingRmsnormRopeSwiglu) {
  const Tensor ids = random_ints({11}, 8, 0, 13);
  const Pair table = pair({13, 24}, 9);
  {
    Tensor out = bf16_empty({11, 24}), ref = f32_empty({11, 24});
    ops::embedding_fwd(ids, table.b, out);
    ops::embedding_fwd(ids, table.f, ref);
    expect_rounded(out, ref, "embedding_fwd bf16 table");
    Tensor out2 = bf16_empty({11, 24});
    ops::embedding_fwd(ids, table.f, out2);  // f32 master table, bf16 activations
    expect_rounded(out2, ref, "embedding_fwd f32 table");
    const Pair dout = pair({11, 24}, 10);
    Tensor dt = random_tensor({13, 24}, 11), dt_ref = dt.clone();
    ops::embedding_bwd(ids, dout.b, dt);
    ops::embedding_bwd(ids, dout.f, dt_ref);
    expect_equal(dt, dt_ref, "embedding_bwd into f32");
  }
  {
    const Pair x = pair({6, 32}, 12), w = pair({32}, 13), dout = pair({6, 32}, 14);
    for (const bool w_bf16 : {true, false}) {
      const Tensor& wt = w_bf16 ? w.b : w.f;
      Tensor out = bf16_empty({6, 32}), rstd = f32_empty({6}), ref = f32_empty({6, 32}), rstd_ref = f32_empty({6});
      ops::rmsnorm_fwd(x.b, wt, 1e-5f, out, rstd);
      ops::rmsnorm_fwd(x.f, w.f, 1e-5f, ref, rstd_ref);
      expect_rounded(out, ref, "rmsnorm_fwd");
      expect_equal(rstd, rstd_ref, "rmsnorm rstd");
      Tensor dx = bf16_empty({6, 32}), dx_ref = f32_empty({6, 32});
      Tensor dw = random_tensor({32}, 15), dw_ref = dw.clone();
      ops::rmsnorm_bwd(x.b, wt, rstd, dout.b, dx, dw);
      ops::rmsnorm_bwd(x.f, w.f, rstd_ref, dout.f, dx_ref, dw_ref);
      expect_rounded(dx, dx_ref, "rmsnorm_bwd dx");
      expect_equal(dw, dw_ref, "rmsnorm_bwd dw f32");
    }
  }
  {
    const Pair x = pair({2, 5, 3, 8}, 16);
    Tensor out = bf16_empty(x.b.shape()), ref = f32_empty(x.b.shape());
    ops::rope_fwd(x.b, 10000.0f, out);
    ops::rope_fwd(x.f, 10000.0f, ref);
    expect_rounded(out, ref, "rope_fwd");
    Tensor inplace = x.b.clone();  // out aliasing x
    ops::rope_fwd(inplace, 10000.0f, inplace);
    expect_rounded(inplace, ref, "rope_fwd in place");
    Tensor dx = bf16_empty(x.b.shape()), dx_ref = f32_empty(x.b.shape());
    ops::rope_bwd(x.b, 10000.0f, dx);
    ops::rope_bwd(x.f, 10000.0f, dx_ref);
    expect_rounded(dx, dx_ref, "rope_bwd");
  }
  {
    const Pair g = pair({5, 19}, 17), u = pair({5, 19}, 18), d = pair({5, 19}, 19);
    Tensor out = bf16_empty({5, 19}), ref = f32_empty({5, 19});
    ops::swiglu_fwd(g.b, u.b, out);
    ops::swiglu_fwd(g.f, u.f, ref);
    expect_rounded(out, ref, "swiglu_fwd");
    Tensor dg = bf16_empty({5, 19}), du = bf16_empty({5, 19}), dg_ref = f32_empty({5, 19}), du_ref = f32_empty({5, 19});
    ops::swiglu_bwd(g.b, u.b, d.b, dg, du);
    ops::swiglu_bwd(g.f, u.f, d.f, dg_ref, du_ref);
    expect_rounded(dg, dg_ref, "swiglu_bwd dgate");
    expect_rounded(du, du_ref, "swiglu_bwd dup");
  }
}

TEST(Bf16Ops, AttentionAndCrossEntropy) {
  const Pair q = pair({2, 7, 4, 8}, 20), k = pair({2, 7, 2, 8}, 21), v = pair({2, 7, 2, 8}, 22),
             dout = pair({2, 7, 4, 8}, 23);
  const float scale = 1.0f / std::sqrt(8.0f);
  Tensor out = bf16_empty(q.b.shape()), lse = f32_empty({2, 4, 7}), ref = f32_empty(q.b.shape()),
         lse_ref = f32_empty({2, 4, 7});
  ops::attention_fwd(q.b, k.b, v.b, scale, out, lse);
  ops::attention_fwd(q.f, k.f, v.f, scale, ref, lse_ref);
  expect_rounded(out, ref, "attention_fwd");
  expect_equal(lse, lse_ref, "attention lse");
  // The backward reads the bf16 forward output, as a bf16 model does.
  const Tensor out_f = f32_of(out);
  Tensor dq = bf16_empty(q.b.shape()), dk = bf16_empty(k.b.shape()), dv = bf16_empty(v.b.shape());
  Tensor dq_ref = f32_empty(q.b.shape()), dk_ref = f32_empty(k.b.shape()), dv_ref = f32_empty(v.b.shape());
  ops::attention_bwd(q.b, k.b, v.b, out, lse, dout.b, scale, dq, dk, dv);
  ops::attention_bwd(q.f, k.f, v.f, out_f, lse_ref, dout.f, scale, dq_ref, dk_ref, dv_ref);
  expect_rounded(dq, dq_ref, "attention_bwd dq");
  expect_rounded(dk, dk_ref, "attention_bwd dk");
  expect_rounded(dv, dv_ref, "attention_bwd dv");

  const Pair logits = pair({6, 29}, 24, 3.0f);
  const Tensor targets = Tensor::from_ints({6}, std::vector<int32_t>{3, -1, 28, 0, 7, 7});
  Tensor losses = f32_empty({6}), lse2 = f32_empty({6}), losses_ref = f32_empty({6}), lse2_ref = f32_empty({6});
  ops::cross_entropy_fwd(logits.b, targets, losses, lse2);
  ops::cross_entropy_fwd(logits.f, targets, losses_ref, lse2_ref);
  expect_equal(losses, losses_ref, "cross_entropy losses");
  expect_equal(lse2, lse2_ref, "cross_entropy lse");
  Tensor partial = f32_empty({6, 3}), partial_ref = f32_empty({6, 3});
  ops::cross_entropy_partial_fwd(logits.b, targets, 0, 29, partial);
  ops::cross_entropy_partial_fwd(logits.f, targets, 0, 29, partial_ref);
  expect_equal(partial, partial_ref, "cross_entropy_partial_fwd");
  Tensor dl = logits.b.clone(), dl_ref = f32_empty({6, 29});
  ops::cross_entropy_bwd(dl, targets, lse2, 0.25f, dl);  // in place, as the LM head's backward
  ops::cross_entropy_bwd(logits.f, targets, lse2_ref, 0.25f, dl_ref);
  expect_rounded(dl, dl_ref, "cross_entropy_bwd in place");
}

TEST(Bf16Ops, PermuteUnpermuteAndGroupedGemm) {
  // 5 tokens, top-2 of 3 experts; one dropped copy.
  const Tensor experts = Tensor::from_ints({5, 2}, std::vector<int32_t>{0, 1, 2, 0, 1, -1, 2, 1, 0, 2});
  Tensor positions = Tensor::empty({5, 2}, DType::kI32), offsets = Tensor::empty({4}, DType::kI64);
  ops::moe_plan(experts, 3, positions, offsets);
  const int64_t m = offsets.data<int64_t>()[3];
  const Pair x = pair({5, 16}, 30);
  Tensor xp = bf16_empty({m, 16}), xp_ref = f32_empty({m, 16});
  ops::moe_permute_fwd(x.b, positions, xp);
  ops::moe_permute_fwd(x.f, positions, xp_ref);
  expect_rounded(xp, xp_ref, "moe_permute_fwd");
  const Pair w = pair({3, 12, 16}, 31);
  Tensor h = bf16_empty({m, 12}), h_ref = f32_empty({m, 12});
  ops::grouped_gemm_fwd(xp, w.b, offsets, h);
  ops::grouped_gemm_fwd(xp_ref, w.f, offsets, h_ref);
  expect_rounded(h, h_ref, "grouped_gemm_fwd");
  const Pair dh = pair({m, 12}, 32);
  Tensor dxp = bf16_empty({m, 16}), dxp_ref = f32_empty({m, 16});
  Tensor dw = random_tensor({3, 12, 16}, 33), dw_ref = dw.clone();
  ops::grouped_gemm_bwd(xp, w.b, offsets, dh.b, dxp, dw);
  ops::grouped_gemm_bwd(xp_ref, w.f, offsets, dh.f, dxp_ref, dw_ref);
  expect_rounded(dxp, dxp_ref, "grouped_gemm_bwd dx");
  expect_equal(dw, dw_ref, "grouped_gemm_bwd dw f32");
  Tensor dx = bf16_empty({5, 16}), dx_ref = f32_empty({5, 16});
  ops::moe_permute_bwd(dxp, positions, dx);
  ops::moe_permute_bwd(f32_of(dxp), positions, dx_ref);
  expect_rounded(dx, dx_ref, "moe_permute_bwd");

  const Tensor weights = random_tensor({5, 2}, 34);
  const Pair y = pair({m, 16}, 35), dout = pair({5, 16}, 36);
  Tensor out = bf16_empty({5, 16}), out_ref = f32_empty({5, 16});
  ops::moe_unpermute_fwd(y.b, positions, weights, out);
  ops::moe_unpermute_fwd(y.f, positions, weights, out_ref);
  expect_rounded(out, out_ref, "moe_unpermute_fwd");
  Tensor dy = bf16_empty({m, 16}), dy_ref = f32_empty({m, 16}), dwt = f32_empty({5, 2}), dwt_ref = f32_empty({5, 2});
  ops::moe_unpermute_bwd(y.b, positions, weights, dout.b, dy, dwt);
  ops::moe_unpermute_bwd(y.f, positions, weights, dout.f, dy_ref, dwt_ref);
  expect_rounded(dy, dy_ref, "moe_unpermute_bwd dy");
  expect_equal(dwt, dwt_ref, "moe_unpermute_bwd dweights f32");
}

TEST(Bf16Ops, CombinationsOutsideTheContractAreNamed) {
  const Tensor f = random_tensor({4, 8}, 40), b = bf16_of(f);
  const Tensor h = Tensor::empty({4, 8}, DType::kF16);
  EXPECT_EQ(error_of([&] { ops::gemm(f, false, b, true, f32_empty({4, 4})); }),
            "gemm: b is bf16 but a is f32; they must have the same dtype");
  EXPECT_EQ(error_of([&] { ops::gemm(f, false, f, true, bf16_empty({4, 4})); }),
            "gemm: c must be f32, got bf16 with shape (4, 4)");
  EXPECT_EQ(error_of([&] { ops::add(h, h, h); }), "add: a must be f32 or bf16, got f16 with shape (4, 8)");
  EXPECT_EQ(error_of([&] { ops::cast(f, h); }), "cast: dst must be f32 or bf16, got f16 with shape (4, 8)");
  EXPECT_EQ(error_of([&] { ops::rmsnorm_fwd(b, bf16_of(random_tensor({8}, 41)), 1e-5f, bf16_empty({4, 8}),
                                            bf16_empty({4})); }),
            "rmsnorm_fwd: rstd must be f32, got bf16 with shape (4)");
  EXPECT_EQ(error_of([&] { ops::swiglu_fwd(b, f, bf16_empty({4, 8})); }),
            "swiglu_fwd: up is f32 but gate is bf16; they must have the same dtype");
  const Tensor positions = Tensor::from_ints({4, 1}, std::vector<int32_t>{0, 1, 2, 3});
  EXPECT_EQ(error_of([&] { ops::moe_unpermute_fwd(b, positions, bf16_empty({4, 1}), bf16_empty({4, 8})); }),
            "moe_unpermute_fwd: weights must be f32, got bf16 with shape (4, 1)");
  EXPECT_EQ(error_of([&] { ops::router_fwd(b, ops::Gating::kSoftmaxTopK, 2, Tensor(), f32_empty({4, 2}),
                                           Tensor::empty({4, 2}, DType::kI32), f32_empty({4, 8})); }),
            "router_fwd: logits must be f32, got bf16 with shape (4, 8)");
}

}  // namespace
}  // namespace moeforge
