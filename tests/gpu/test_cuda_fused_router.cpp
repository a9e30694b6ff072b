// Tests the warp-per-token router (runtime/cuda/fused_router.cu, behind ops::router_fwd and
// ops::router_bwd on CUDA) against the CPU op: the same experts (exactly), weights and probs, and
// dlogits, fp32 to 1e-5, for both gatings with and without the selection bias, k = 1, 2 and 8, and
// E = 8, 37 (not a multiple of the warp), 64, 100 and 256 (scores in registers) and 300 (the
// generic path); and ties, which both backends must break toward the lower expert id.
//
// Then the internal fused entry points (runtime/cuda/kernels.h): router_fwd_with_stats against
// the CPU router_fwd, and its statistics against a host reduction of its own probs and experts
// (the probability mass per expert to 1e-5, the selected counts exactly) and the rows' lse,
// bitwise reproducible across runs; the losses from those statistics against the CPU
// moe_aux_loss_fwd and router_z_loss_fwd; and router_bwd_fused against the CPU sequence
// moe_aux_loss_bwd -> router_bwd -> router_z_loss_bwd, for every combination of its terms.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "runtime/cuda/kernels.h"

#include "tests/gpu/gpu_testing.h"
#include "tests/testing.h"

namespace moeforge {
namespace {

using namespace gpu_testing;
using testing::random_tensor;

void expect_router_matches(const Tensor& logits, ops::Gating g, int k, const Tensor& bias, const char* what) {
  const int64_t n = logits.dim(0), e = logits.dim(1);
  Tensor w = Tensor::empty({n, k}, DType::kF32), ex = Tensor::empty({n, k}, DType::kI32);
  Tensor probs = Tensor::empty({n, e}, DType::kF32);
  ops::router_fwd(logits, g, k, bias, w, ex, probs);
  const Tensor gl = to_gpu(logits), gw = poisoned({n, k}), gex = poisoned({n, k}, DType::kI32), gp = poisoned({n, e});
  ops::router_fwd(gl, g, k, bias.defined() ? to_gpu(bias) : Tensor(), gw, gex, gp);
  expect_equal_ints(gex, ex, what);
  EXPECT_GPU_CLOSE(gw, w, kF32Tol) << what << " " << ops::gating_name(g) << " E=" << e << " k=" << k;
  EXPECT_GPU_CLOSE(gp, probs, kF32Tol) << what << " " << ops::gating_name(g) << " E=" << e << " k=" << k;

  for (const bool with_dprobs : {false, true}) {
    const Tensor dw = random_tensor({n, k}, 11), dp = with_dprobs ? random_tensor({n, e}, 12) : Tensor();
    Tensor dl = Tensor::empty({n, e}, DType::kF32);
    ops::router_bwd(logits, g, ex, dw, dp, dl);
    const Tensor gdl = poisoned({n, e});
    ops::router_bwd(gl, g, gex, to_gpu(dw), with_dprobs ? to_gpu(dp) : Tensor(), gdl);
    EXPECT_GPU_CLOSE(gdl, dl, kF32Tol) << what << " " << ops::gating_name(g) << " E=" << e << " k=" << k
                                       << " dprobs=" << with_dprobs;
  }
}

TEST(GpuFusedRouter, MatchesTheCpuUpTo256Experts) {
  MOE_REQUIRE_GPU();
  for (const int64_t e : {8, 37, 64, 100, 256, 300})
    for (const int k : {1, 2, 8}) {
      if (k > e) continue;
      const Tensor logits = random_tensor({301, e}, 100 + e, 3.0f);
      const Tensor bias = random_tensor({e}, 200 + e, 0.1f);
      for (const ops::Gating g : {ops::Gating::kSoftmaxTopK, ops::Gating::kSigmoidTopK}) {
        expect_router_matches(logits, g, k, Tensor(), "no bias");
        expect_router_matches(logits, g, k, bias, "bias");
      }
    }
}

TEST(GpuFusedRouter, TiesGoToTheLowerExpertId) {
  MOE_REQUIRE_GPU();
  // Logits from {-1, 0, 1}: many exact ties among 64 experts in every row.
  const Tensor ints = testing::random_ints({97, 64}, 7, -1, 2);
  std::vector<float> v(ints.numel());
  for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>(ints.data<int32_t>()[i]);
  const Tensor logits = Tensor::from_floats({97, 64}, v);
  for (const ops::Gating g : {ops::Gating::kSoftmaxTopK, ops::Gating::kSigmoidTopK})
    for (const int k : {2, 8}) expect_router_matches(logits, g, k, Tensor(), "ties");
}

// Host reference of the statistics from the CPU router's outputs, in double.
struct HostStats {
  Tensor prob_mass, selected, lse;
};

HostStats host_stats(const Tensor& logits, const Tensor& probs, const Tensor& experts) {
  const int64_t n = logits.dim(0), e = logits.dim(1), k = experts.dim(1);
  std::vector<float> mass(static_cast<size_t>(e)), lse(static_cast<size_t>(n));
  std::vector<double> col(static_cast<size_t>(e), 0.0);
  Tensor selected = Tensor::zeros({e}, DType::kI64);
  for (int64_t r = 0; r < n; ++r) {
    const float* l = logits.data<float>() + r * e;
    double mx = l[0];
    for (int64_t j = 1; j < e; ++j) mx = std::max(mx, static_cast<double>(l[j]));
    double sum = 0.0;
    for (int64_t j = 0; j < e; ++j) {
      sum += std::exp(l[j] - mx);
      col[j] += probs.data<float>()[r * e + j];
    }
    lse[r] = static_cast<float>(mx + std::log(sum));
    for (int64_t j = 0; j < k; ++j) ++selected.data<int64_t>()[experts.data<int32_t>()[r * k + j]];
  }
  for (int64_t j = 0; j < e; ++j) mass[j] = static_cast<float>(col[j]);
  return {Tensor::from_floats({e}, mass), selected, Tensor::from_floats({n}, lse)};
}

bool same_bits(const Tensor& a, const Tensor& b) {
  const Tensor x = to_cpu(a), y = to_cpu(b);
  return x.nbytes() == y.nbytes() && std::memcmp(x.raw_data(), y.raw_data(), x.nbytes()) == 0;
}

TEST(GpuFusedRouter, StatisticsMatchTheCpuAndAreReproducible) {
  MOE_REQUIRE_GPU();
  // N not a multiple of the 64-row stats blocks (or of the warps); E = 8 .. 256 with 1, 2, 4 and 8
  // scores per lane in registers, 2048 (generic path, two warps per stats block) and 4096 (one).
  const struct {
    int64_t n, e;
  } sizes[] = {{1, 8}, {301, 37}, {2000, 100}, {1029, 256}, {70001, 8}, {517, 2048}, {130, 4096}};
  for (const auto& sz : sizes)
    for (const int k : {1, 2, 8}) {
      if (k > sz.e) continue;
      const int64_t n = sz.n, e = sz.e;
      const Tensor logits = random_tensor({n, e}, 300 + e + k, 3.0f), bias = random_tensor({e}, 400 + e, 0.1f);
      for (const ops::Gating g : {ops::Gating::kSoftmaxTopK, ops::Gating::kSigmoidTopK})
        for (const bool with_bias : {false, true}) {
          const std::string what = std::string(ops::gating_name(g)) + " N=" + std::to_string(n) +
                                   " E=" + std::to_string(e) + " k=" + std::to_string(k) + (with_bias ? " bias" : "");
          SCOPED_TRACE(what);
          const Tensor b = with_bias ? bias : Tensor();
          Tensor w = Tensor::empty({n, k}, DType::kF32), ex = Tensor::empty({n, k}, DType::kI32);
          Tensor probs = Tensor::empty({n, e}, DType::kF32);
          ops::router_fwd(logits, g, k, b, w, ex, probs);

          const Tensor gl = to_gpu(logits), gb = with_bias ? to_gpu(bias) : Tensor();
          const Tensor gw = poisoned({n, k}), gex = poisoned({n, k}, DType::kI32), gp = poisoned({n, e});
          ops::RouterStats st = ops::RouterStats::allocate(n, e, gpu());
          ops::fill(st.prob_mass, NAN);
          ops::fill(st.selected, -777.0f);
          ops::fill(st.lse, NAN);
          ops::router_fwd_with_stats(gl, g, k, gb, gw, gex, gp, st);
          // The statistics against the GPU's own probs and experts (so that they are checked
          // even where the router itself would differ); the router against the CPU.
          const HostStats want = host_stats(logits, to_cpu(gp), to_cpu(gex));
          expect_equal_ints(gex, ex, "experts");
          EXPECT_GPU_CLOSE(gw, w, kF32Tol);
          EXPECT_GPU_CLOSE(gp, probs, kF32Tol);
          EXPECT_GPU_CLOSE(st.prob_mass, want.prob_mass, kF32Tol);
          expect_equal_ints(st.selected, want.selected, "selected");
          EXPECT_GPU_CLOSE(st.lse, want.lse, kF32Tol);

          // The same launch again: bitwise the same statistics.
          const ops::RouterStats again = ops::RouterStats::allocate(n, e, gpu());
          ops::router_fwd_with_stats(gl, g, k, gb, poisoned({n, k}), poisoned({n, k}, DType::kI32), poisoned({n, e}),
                                      again);
          EXPECT_TRUE(same_bits(again.prob_mass, st.prob_mass)) << "prob_mass not reproducible";
          EXPECT_TRUE(same_bits(again.lse, st.lse)) << "lse not reproducible";

          // The losses from the statistics vs the catalog ops on the CPU, over 2N tokens (as if
          // another rank held the other half) with the selected counts as the aux loss's counts.
          Tensor loss = Tensor::empty({1}, DType::kF32);
          const Tensor gloss = poisoned({1});
          ops::moe_aux_loss_fwd(probs, want.selected, k, 2 * n, loss);
          ops::moe_aux_loss_fwd_from_stats(st, to_gpu(want.selected), k, 2 * n, gloss);
          EXPECT_GPU_CLOSE(gloss, loss, kF32Tol) << "aux loss";
          ops::router_z_loss_fwd(logits, 2 * n, loss);
          ops::router_z_loss_fwd_from_stats(st, 2 * n, gloss);
          EXPECT_GPU_CLOSE(gloss, loss, kF32Tol) << "z-loss";
          // And the catalog losses on the GPU (their own reductions) agree too.
          ops::moe_aux_loss_fwd(probs, want.selected, k, 2 * n, loss);
          ops::moe_aux_loss_fwd(gp, to_gpu(want.selected), k, 2 * n, gloss);
          EXPECT_GPU_CLOSE(gloss, loss, kF32Tol) << "catalog aux loss";
        }
    }
}

TEST(GpuFusedRouter, StatisticsOfNoRowsAreZero) {
  MOE_REQUIRE_GPU();
  const int64_t e = 16;
  const ops::RouterStats st = ops::RouterStats::allocate(0, e, gpu());
  ops::fill(st.prob_mass, NAN);
  ops::router_fwd_with_stats(poisoned({0, e}), ops::Gating::kSoftmaxTopK, 2, Tensor(), poisoned({0, 2}),
                              poisoned({0, 2}, DType::kI32), poisoned({0, e}), st);
  EXPECT_GPU_CLOSE(st.prob_mass, Tensor::zeros({e}, DType::kF32), 0.0);
  expect_equal_ints(st.selected, Tensor::zeros({e}, DType::kI64), "selected");
}

TEST(GpuFusedRouter, FusedBackwardMatchesTheCpuSequence) {
  MOE_REQUIRE_GPU();
  const struct {
    int64_t n, e;
    int k;
  } sizes[] = {{301, 37, 2}, {1029, 256, 8}, {130, 8, 1}};
  for (const auto& sz : sizes) {
    const int64_t n = sz.n, e = sz.e, tokens = 3 * n;
    const int k = sz.k;
    const Tensor logits = random_tensor({n, e}, 500 + e, 3.0f);
    Tensor counts = Tensor::empty({e}, DType::kI64);
    for (int64_t j = 0; j < e; ++j) counts.data<int64_t>()[j] = (7 * j + 3) % 50;
    for (const ops::Gating g : {ops::Gating::kSoftmaxTopK, ops::Gating::kSigmoidTopK}) {
      Tensor w = Tensor::empty({n, k}, DType::kF32), ex = Tensor::empty({n, k}, DType::kI32);
      Tensor probs = Tensor::empty({n, e}, DType::kF32);
      ops::router_fwd(logits, g, k, Tensor(), w, ex, probs);
      const Tensor gl = to_gpu(logits), gex = to_gpu(ex);
      const ops::RouterStats st = ops::RouterStats::allocate(n, e, gpu());
      ops::router_fwd_with_stats(gl, g, k, Tensor(), poisoned({n, k}), poisoned({n, k}, DType::kI32),
                                  poisoned({n, e}), st);
      const Tensor dw = random_tensor({n, k}, 13), dp = random_tensor({n, e}, 14);
      for (const bool with_dprobs : {false, true})
        for (const bool aux : {false, true})
          for (const bool z : {false, true}) {
            SCOPED_TRACE(std::string(ops::gating_name(g)) + " E=" + std::to_string(e) + " k=" + std::to_string(k) +
                         " dprobs=" + std::to_string(with_dprobs) + " aux=" + std::to_string(aux) +
                         " z=" + std::to_string(z));
            // The CPU sequence the fused kernel replaces.
            Tensor dprobs;
            if (with_dprobs || aux) {
              dprobs = Tensor::zeros({n, e}, DType::kF32);
              if (aux) ops::moe_aux_loss_bwd(probs, counts, k, tokens, 0.25f, dprobs);
              if (with_dprobs) ops::add_(dprobs, dp);
            }
            Tensor dl = Tensor::empty({n, e}, DType::kF32);
            ops::router_bwd(logits, g, ex, dw, dprobs, dl);
            if (z) ops::router_z_loss_bwd(logits, tokens, 0.5f, dl);

            ops::RouterLossGrads terms;
            terms.num_tokens = tokens;
            if (aux) {
              terms.counts = to_gpu(counts);
              terms.k = k;
              terms.aux_scale = 0.25f;
            }
            if (z) {
              terms.lse = st.lse;
              terms.z_scale = 0.5f;
            }
            const Tensor gdl = poisoned({n, e});
            ops::router_bwd_fused(gl, g, gex, to_gpu(dw), with_dprobs ? to_gpu(dp) : Tensor(), terms, gdl);
            EXPECT_GPU_CLOSE(gdl, dl, kF32Tol);
          }
    }
  }
}

}  // namespace
}  // namespace moeforge
