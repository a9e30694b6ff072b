// Tensor-level CUDA MoE routing ops and the grouped expert GEMM: grid-limit checks, scratch from
// the caching allocator, launch status checks (kernels in fused_router.cu, router.cu,
// moe_dispatch.cu and grouped_gemm.cu; launch sizes in routing_plan.h), including the router with
// its losses in one pass (router_fwd_with_stats, the losses from its statistics, router_bwd_fused).
#include <algorithm>
#include <limits>

#include "runtime/cuda/cuda_check.h"
#include "runtime/cuda/device.h"
#include "runtime/cuda/kernels.h"
#include "runtime/cuda/launchers.h"
#include "runtime/cuda/routing_plan.h"
#include "runtime/op_checks.h"

namespace moeforge::cuda {
namespace {

cudaStream_t stream_of(const Tensor& t) { return stream(t.device().index); }

void check_blocks(std::string_view op, int64_t blocks, std::string_view what) {
  MOE_CHECK(blocks < (int64_t{1} << 31), "{}: {} {} exceed the CUDA grid", op, blocks, what);
}

void check_experts(std::string_view op, int64_t e) {
  MOE_CHECK(e <= routing::kMaxRankExperts, "{}: {} experts exceed the CUDA kernel's maximum of {}", op, e,
            routing::kMaxRankExperts);
}

// Scratch of the counting-sort kernels for `count` ids over e experts.
Tensor rank_scratch(const Tensor& like, int64_t count, int64_t e) {
  return Tensor::empty({routing::plan_ranks(count, e).scratch_i32}, DType::kI32, like.device());
}

// A scratch tensor of `count` doubles (there is no f64 dtype: 8-byte i64 elements).
Tensor f64_scratch(const Tensor& like, int64_t count) {
  return Tensor::empty({std::max<int64_t>(1, count)}, DType::kI64, like.device());
}

}  // namespace

void router_fwd(const Tensor& logits, ops::Gating gating, int k, const Tensor& bias, const Tensor& weights,
                const Tensor& experts, const Tensor& probs) {
  const int64_t n = logits.dim(0), e = logits.dim(1);
  if (n == 0) return;
  check_blocks("router_fwd", (n + 3) / 4, "blocks of 4 tokens");
  MOE_CUDA_CHECK(launch::fused_router_fwd(logits.data<float>(), n, e, gating == ops::Gating::kSigmoidTopK, k,
                                          bias.defined() ? bias.data<float>() : nullptr, weights.data<float>(),
                                          experts.data<int32_t>(), probs.data<float>(), nullptr, stream_of(logits)));
}

void router_bwd(const Tensor& logits, ops::Gating gating, const Tensor& experts, const Tensor& dweights,
                const Tensor& dprobs, const Tensor& dlogits) {
  const int64_t n = logits.dim(0), e = logits.dim(1);
  if (n == 0) return;
  check_blocks("router_bwd", (n + 3) / 4, "blocks of 4 tokens");
  MOE_CUDA_CHECK(launch::fused_router_bwd(logits.data<float>(), n, e, gating == ops::Gating::kSigmoidTopK,
                                          static_cast<int>(experts.dim(1)), experts.data<int32_t>(),
                                          dweights.data<float>(), dprobs.defined() ? dprobs.data<float>() : nullptr,
                                          nullptr, nullptr, 0.0f, 1, dlogits.data<float>(), stream_of(logits)));
}

void moe_aux_loss_fwd(const Tensor& probs, const Tensor& counts, int k, int64_t num_tokens, const Tensor& loss) {
  const int64_t n = probs.dim(0), e = probs.dim(1);
  const routing::ColumnPlan p = routing::plan_column_sums(n, e);
  check_blocks("moe_aux_loss_fwd", p.row_blocks, "row blocks");
  const Tensor scratch = f64_scratch(probs, p.row_blocks * e + e);
  MOE_CUDA_CHECK(launch::moe_aux_loss_fwd(probs.data<float>(), counts.data<int64_t>(), n, e, k, num_tokens,
                                          loss.data<float>(), static_cast<double*>(scratch.raw_data()),
                                          stream_of(probs)));
}

void moe_aux_loss_bwd(const Tensor& probs, const Tensor& counts, int k, int64_t num_tokens, float scale,
                      const Tensor& dprobs) {
  if (probs.numel() == 0) return;
  MOE_CUDA_CHECK(launch::moe_aux_loss_bwd(counts.data<int64_t>(), probs.dim(0), probs.dim(1), k, num_tokens, scale,
                                          dprobs.data<float>(), stream_of(probs)));
}

void router_z_loss_fwd(const Tensor& logits, int64_t num_tokens, const Tensor& loss) {
  const int64_t n = logits.dim(0);
  const Tensor scratch = Tensor::empty({std::max<int64_t>(n, 1)}, DType::kF32, logits.device());
  MOE_CUDA_CHECK(launch::router_z_loss_fwd(logits.data<float>(), n, logits.dim(1), num_tokens, loss.data<float>(),
                                           scratch.data<float>(), stream_of(logits)));
}

void router_z_loss_bwd(const Tensor& logits, int64_t num_tokens, float scale, const Tensor& dlogits) {
  const int64_t n = logits.dim(0);
  if (n == 0) return;
  MOE_CUDA_CHECK(launch::router_z_loss_bwd(logits.data<float>(), n, logits.dim(1), num_tokens, scale,
                                           dlogits.data<float>(), stream_of(logits)));
}

void moe_plan(const Tensor& experts, int num_experts, const Tensor& positions, const Tensor& offsets) {
  check_experts("moe_plan", num_experts);
  const int64_t m = experts.numel();
  const Tensor scratch = rank_scratch(experts, m, num_experts);
  MOE_CUDA_CHECK(launch::moe_plan(experts.data<int32_t>(), m, num_experts, positions.data<int32_t>(),
                                  offsets.data<int64_t>(), scratch.data<int32_t>(), stream_of(experts)));
}

void moe_apply_capacity(const Tensor& experts, int64_t capacity, const Tensor& base, const Tensor& dispatch) {
  const int64_t n = experts.dim(0), k = experts.dim(1), e = base.dim(1);
  check_experts("moe_apply_capacity", e);
  if (n == 0 || k == 0) return;
  MOE_CHECK(capacity >= 0, "moe_apply_capacity: capacity={} must be >= 0", capacity);
  MOE_CHECK(n <= std::numeric_limits<int32_t>::max(),
            "moe_apply_capacity: experts has shape {}: {} rows exceed the int32 ranks of the CUDA kernel",
            experts.shape().str(), n);
  const Tensor scratch = rank_scratch(experts, n, e);
  MOE_CUDA_CHECK(launch::moe_apply_capacity(experts.data<int32_t>(), n, k, e, capacity, base.data<int64_t>(),
                                            dispatch.data<int32_t>(), scratch.data<int32_t>(), stream_of(experts)));
}

void moe_permute_fwd(const Tensor& x, const Tensor& positions, const Tensor& out) {
  const int64_t n = x.dim(0), c = x.dim(1);
  if (n == 0 || c == 0) return;
  check_blocks("moe_permute_fwd", n, "token rows");
  MOE_CUDA_CHECK_COMPUTE_DTYPE("moe_permute_fwd", "x", x);
  MOE_CUDA_CHECK_SAME_DTYPE("moe_permute_fwd", "out", out, "x", x);
  MOE_CUDA_CHECK(launch::moe_permute_fwd(x.raw_data(), positions.data<int32_t>(), out.raw_data(), x.dtype(), n,
                                         positions.dim(1), c, out.dim(0), stream_of(x)));
}

void moe_permute_bwd(const Tensor& dout, const Tensor& positions, const Tensor& dx) {
  const int64_t n = dx.dim(0), c = dx.dim(1);
  if (n == 0 || c == 0) return;
  check_blocks("moe_permute_bwd", n, "token rows");
  MOE_CUDA_CHECK_COMPUTE_DTYPE("moe_permute_bwd", "dout", dout);
  MOE_CUDA_CHECK_SAME_DTYPE("moe_permute_bwd", "dx", dx, "dout", dout);
  MOE_CUDA_CHECK(launch::moe_permute_bwd(dout.raw_data(), positions.data<int32_t>(), dx.raw_data(), dout.dtype(), n,
                                         positions.dim(1), c, dout.dim(0), stream_of(dx)));
}

void moe_unpermute_fwd(const Tensor& y, const Tensor& positions, const Tensor& weights, const Tensor& out) {
  const int64_t n = out.dim(0), c = out.dim(1);
  if (n == 0 || c == 0) return;
  check_blocks("moe_unpermute_fwd", n, "token rows");
  MOE_CUDA_CHECK_COMPUTE_DTYPE("moe_unpermute_fwd", "y", y);
  MOE_CUDA_CHECK_SAME_DTYPE("moe_unpermute_fwd", "out", out, "y", y);
  MOE_CHECK(weights.dtype() == DType::kF32, "moe_unpermute_fwd: weights must be f32, got {}", weights.str());
  MOE_CUDA_CHECK(launch::moe_unpermute_fwd(y.raw_data(), positions.data<int32_t>(), weights.data<float>(),
                                           out.raw_data(), y.dtype(), n, positions.dim(1), c, y.dim(0),
                                           stream_of(out)));
}

void moe_unpermute_bwd(const Tensor& y, const Tensor& positions, const Tensor& weights, const Tensor& dout,
                       const Tensor& dy, const Tensor& dweights) {
  const int64_t n = dout.dim(0), c = dout.dim(1), k = positions.dim(1);
  if (n == 0) return;
  check_blocks("moe_unpermute_bwd", n * k, "token copies");
  MOE_CUDA_CHECK_COMPUTE_DTYPE("moe_unpermute_bwd", "y", y);
  MOE_CUDA_CHECK_SAME_DTYPE("moe_unpermute_bwd", "dout", dout, "y", y);
  MOE_CUDA_CHECK_SAME_DTYPE("moe_unpermute_bwd", "dy", dy, "y", y);
  MOE_CHECK(weights.dtype() == DType::kF32 && dweights.dtype() == DType::kF32,
            "moe_unpermute_bwd: weights and dweights must be f32, got {} and {}", weights.str(), dweights.str());
  MOE_CUDA_CHECK(launch::moe_unpermute_bwd(y.raw_data(), positions.data<int32_t>(), weights.data<float>(),
                                           dout.raw_data(), dy.raw_data(), dweights.data<float>(), y.dtype(), n, k, c,
                                           y.dim(0), stream_of(dout)));
}

void grouped_gemm_fwd(const Tensor& x, const Tensor& w, const Tensor& offsets, const Tensor& out) {
  const int64_t m = x.dim(0), e = w.dim(0), cout = w.dim(1);
  if (m == 0 || cout == 0) return;
  MOE_CHECK((m + 63) / 64 + e < (int64_t{1} << 31) && (cout + 63) / 64 < 65536,
            "grouped_gemm_fwd: x {} and w {} exceed the CUDA grid", x.shape().str(), w.shape().str());
  MOE_CUDA_CHECK_COMPUTE_DTYPE("grouped_gemm_fwd", "x", x);
  MOE_CUDA_CHECK_SAME_DTYPE("grouped_gemm_fwd", "w", w, "x", x);
  MOE_CUDA_CHECK_SAME_DTYPE("grouped_gemm_fwd", "out", out, "x", x);
  MOE_CUDA_CHECK(launch::grouped_gemm_fwd(x.raw_data(), w.raw_data(), offsets.data<int64_t>(), out.raw_data(),
                                          x.dtype(), m, e, x.dim(1), cout, stream_of(x)));
}

void grouped_gemm_bwd(const Tensor& x, const Tensor& w, const Tensor& offsets, const Tensor& dout, const Tensor& dx,
                      const Tensor& dw) {
  const int64_t m = x.dim(0), cin = x.dim(1), e = w.dim(0), cout = w.dim(1);
  MOE_CUDA_CHECK_COMPUTE_DTYPE("grouped_gemm_bwd", "x", x);
  MOE_CUDA_CHECK_SAME_DTYPE("grouped_gemm_bwd", "w", w, "x", x);
  MOE_CUDA_CHECK_SAME_DTYPE("grouped_gemm_bwd", "dout", dout, "x", x);
  MOE_CUDA_CHECK_SAME_DTYPE("grouped_gemm_bwd", "dx", dx, "x", x);
  MOE_CHECK(dw.dtype() == DType::kF32 || dw.dtype() == x.dtype(),
            "grouped_gemm_bwd: the CUDA kernel takes dw as f32 or x's dtype ({}), got {}", x.str(), dw.str());
  if (e == 0 || cin == 0) return;
  if (cout == 0) {  // dx = dout · w is an empty sum; dw has no elements
    if (m > 0) fill(dx, 0.0f);
    return;
  }
  MOE_CHECK((m + 63) / 64 + e < (int64_t{1} << 31) && (std::max(cin, cout) + 63) / 64 < 65536 && e < 65536,
            "grouped_gemm_bwd: x {} and w {} exceed the CUDA grid", x.shape().str(), w.shape().str());
  MOE_CUDA_CHECK(launch::grouped_gemm_bwd(x.raw_data(), w.raw_data(), offsets.data<int64_t>(), dout.raw_data(),
                                          dx.raw_data(), dw.raw_data(), x.dtype(), dw.dtype(), m, e, cin, cout,
                                          stream_of(x)));
}

// ---- the router with its losses in one pass (arguments checked by the catalog) ------------------

void router_fwd_with_stats(const Tensor& logits, ops::Gating gating, int k, const Tensor& bias, const Tensor& weights,
                           const Tensor& experts, const Tensor& probs, const RouterStats& stats) {
  constexpr std::string_view op = "router_fwd_with_stats";
  const int64_t n = logits.dim(0), e = logits.dim(1);
  MOE_CHECK(e <= routing::kGatingMaxStatsExperts,
            "{}: logits has shape {}: {} experts exceed the fused statistics' maximum of {}", op,
            logits.shape().str(), e, routing::kGatingMaxStatsExperts);
  if (n == 0) {  // no rows: zero statistics
    fill(stats.prob_mass, 0.0f);
    fill(stats.selected, 0.0f);
    return;
  }
  const routing::GatingPlan p = routing::plan_gating(n, e, true);
  check_blocks(op, p.blocks, "blocks of rows");
  const Tensor mass_partial = f64_scratch(logits, p.partial_rows * e);
  const Tensor count_partial = Tensor::empty({std::max<int64_t>(1, p.partial_rows * e)}, DType::kI32, logits.device());
  const launch::RouterStatsBuffers buffers{static_cast<double*>(mass_partial.raw_data()), count_partial.data<int32_t>(),
                                           stats.prob_mass.data<float>(), stats.selected.data<int64_t>(),
                                           stats.lse.data<float>()};
  MOE_CUDA_CHECK(launch::fused_router_fwd(logits.data<float>(), n, e, gating == ops::Gating::kSigmoidTopK, k,
                                          bias.defined() ? bias.data<float>() : nullptr, weights.data<float>(),
                                          experts.data<int32_t>(), probs.data<float>(), &buffers, stream_of(logits)));
}

void moe_aux_loss_fwd_from_stats(const RouterStats& stats, const Tensor& counts, int k, int64_t num_tokens,
                                 const Tensor& loss) {
  MOE_CUDA_CHECK(launch::moe_aux_loss_fwd_from_mass(stats.prob_mass.data<float>(), counts.data<int64_t>(),
                                                    stats.lse.numel(), stats.prob_mass.numel(), k, num_tokens,
                                                    loss.data<float>(), stream_of(loss)));
}

void router_z_loss_fwd_from_stats(const RouterStats& stats, int64_t num_tokens, const Tensor& loss) {
  MOE_CUDA_CHECK(launch::router_z_loss_fwd_from_lse(stats.lse.data<float>(), stats.lse.numel(), num_tokens,
                                                    loss.data<float>(), stream_of(loss)));
}

void router_bwd_fused(const Tensor& logits, ops::Gating gating, const Tensor& experts, const Tensor& dweights,
                      const Tensor& dprobs, const RouterLossGrads& losses, const Tensor& dlogits) {
  constexpr std::string_view op = "router_bwd_fused";
  const int64_t n = logits.dim(0), e = logits.dim(1);
  const bool aux = losses.counts.defined(), z = losses.lse.defined();
  Tensor dprobs_row;  // (E): the aux loss's dprobs, the same for every row
  if (aux) {
    dprobs_row = Tensor::empty({e}, DType::kF32, logits.device());
    // One row of moe_aux_loss_bwd: the very values the catalog op writes in every row.
    MOE_CUDA_CHECK(launch::moe_aux_loss_bwd(losses.counts.data<int64_t>(), 1, e, losses.k, losses.num_tokens,
                                            losses.aux_scale, dprobs_row.data<float>(), stream_of(logits)));
  }
  if (n == 0) return;
  check_blocks(op, routing::plan_gating(n, e, false).blocks, "blocks of 4 tokens");
  MOE_CUDA_CHECK(launch::fused_router_bwd(
      logits.data<float>(), n, e, gating == ops::Gating::kSigmoidTopK, static_cast<int>(experts.dim(1)),
      experts.data<int32_t>(), dweights.data<float>(), dprobs.defined() ? dprobs.data<float>() : nullptr,
      aux ? dprobs_row.data<float>() : nullptr, z ? losses.lse.data<float>() : nullptr, losses.z_scale,
      std::max<int64_t>(1, losses.num_tokens), dlogits.data<float>(), stream_of(logits)));
}

}  // namespace moeforge::cuda
