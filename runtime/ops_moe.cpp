// Validation and dispatch of the MoE routing ops: router top-k, its losses, the dispatch plan,
// permute / unpermute and the grouped expert GEMM. Checks here need only shapes and dtypes; the
// CPU kernels check what depends on the data (expert ids, positions, offsets).
#include <cstdint>
#include <limits>

#include "runtime/cpu/moe.h"
#include "runtime/op_checks.h"
#include "runtime/ops.h"

namespace moeforge::ops {

using detail::check_dtype;
using detail::Widened;
using detail::check_ndim;
using detail::check_same_device;
using detail::check_same_shape;
using detail::check_shape;
using detail::NamedTensor;

namespace {

void check_k(std::string_view op, int k, int64_t num_experts) {
  MOE_CHECK(k >= 1 && k <= num_experts, "{}: k={} must be in [1, E={}]", op, k, num_experts);
}

// logits-like (N, E) f32 with E >= 1.
void check_logits(std::string_view op, NamedTensor logits) {
  check_dtype(op, logits, DType::kF32);
  check_ndim(op, logits, 2);
  MOE_CHECK(logits.t.dim(1) >= 1, "{}: {} has shape {}; expected at least one expert column", op, logits.name,
            logits.t.shape().str());
}

// positions (N, K) i32 with K >= 1.
void check_positions(std::string_view op, const Tensor& positions) {
  check_dtype(op, {"positions", positions}, DType::kI32);
  check_ndim(op, {"positions", positions}, 2);
  MOE_CHECK(positions.dim(1) >= 1, "{}: positions has shape {}; expected at least one column (K >= 1)", op,
            positions.shape().str());
}

// The expert-grouped buffer t (M, cols) of the copies planned in positions (N, K): M <= N * K
// (fewer when capacity mode dropped copies; the kernel checks M against the kept copies).
void check_copy_rows(std::string_view op, NamedTensor t, const Tensor& positions, int64_t cols, NamedTensor ref) {
  detail::check_float(op, t);
  MOE_CHECK(t.t.ndim() == 2 && t.t.dim(1) == cols && t.t.dim(0) <= positions.numel(),
            "{}: {} has shape {} but positions has shape {} and {} has shape {}; expected {} of shape (M, {}) "
            "with M <= {}",
            op, t.name, t.t.shape().str(), positions.shape().str(), ref.name, ref.t.shape().str(), t.name, cols,
            positions.numel());
}

// The token count a router loss is normalised by covers at least the rows given here (more when the
// rows are one rank's share of a sequence-parallel batch).
void check_num_tokens(std::string_view op, int64_t num_tokens, NamedTensor rows) {
  MOE_CHECK(num_tokens >= rows.t.dim(0), "{}: num_tokens={} must be >= the {} rows of {} (shape {})", op, num_tokens,
            rows.t.dim(0), rows.name, rows.t.shape().str());
}

// A 1-element f32 loss.
void check_loss(std::string_view op, const Tensor& loss, NamedTensor ref) {
  check_dtype(op, {"loss", loss}, DType::kF32);
  check_shape(op, {"loss", loss}, Shape{1}, ref);
}

}  // namespace

const char* gating_name(Gating g) {
  switch (g) {
    case Gating::kSoftmaxTopK:
      return "softmax_topk";
    case Gating::kSigmoidTopK:
      return "sigmoid_topk";
  }
  MOE_THROW("gating_name: unknown Gating value {}", static_cast<int>(g));
}

namespace detail {
Device check_router_fwd(std::string_view op, const Tensor& logits, int k, const Tensor& bias, const Tensor& weights,
                        const Tensor& experts, const Tensor& probs) {
  const Device dev = check_same_device(op, {{"logits", logits}, {"weights", weights}, {"experts", experts},
                                            {"probs", probs}});
  check_logits(op, {"logits", logits});
  const int64_t n = logits.dim(0), e = logits.dim(1);
  check_k(op, k, e);
  if (bias.defined()) {
    check_same_device(op, {{"logits", logits}, {"bias", bias}});
    check_dtype(op, {"bias", bias}, DType::kF32);
    check_shape(op, {"bias", bias}, Shape{e}, {"logits", logits});
  }
  check_dtype(op, {"weights", weights}, DType::kF32);
  check_shape(op, {"weights", weights}, Shape{n, k}, {"logits", logits});
  check_dtype(op, {"experts", experts}, DType::kI32);
  check_shape(op, {"experts", experts}, Shape{n, k}, {"logits", logits});
  check_dtype(op, {"probs", probs}, DType::kF32);
  check_same_shape(op, {"probs", probs}, {"logits", logits});
  return dev;
}

Device check_router_bwd(std::string_view op, const Tensor& logits, const Tensor& experts, const Tensor& dweights,
                        const Tensor& dprobs, const Tensor& dlogits) {
  const Device dev = check_same_device(op, {{"logits", logits}, {"experts", experts}, {"dweights", dweights},
                                            {"dlogits", dlogits}});
  check_logits(op, {"logits", logits});
  const int64_t n = logits.dim(0), e = logits.dim(1);
  check_dtype(op, {"experts", experts}, DType::kI32);
  check_ndim(op, {"experts", experts}, 2);
  check_shape(op, {"experts", experts}, Shape{n, experts.dim(1)}, {"logits", logits});
  MOE_CHECK(experts.dim(1) >= 1 && experts.dim(1) <= e, "{}: experts has shape {}; its K={} must be in [1, E={}]",
            op, experts.shape().str(), experts.dim(1), e);
  check_dtype(op, {"dweights", dweights}, DType::kF32);
  check_same_shape(op, {"dweights", dweights}, {"experts", experts});
  if (dprobs.defined()) {
    check_same_device(op, {{"logits", logits}, {"dprobs", dprobs}});
    check_dtype(op, {"dprobs", dprobs}, DType::kF32);
    check_same_shape(op, {"dprobs", dprobs}, {"logits", logits});
  }
  check_dtype(op, {"dlogits", dlogits}, DType::kF32);
  check_same_shape(op, {"dlogits", dlogits}, {"logits", logits});
  return dev;
}
}  // namespace detail

void router_fwd(const Tensor& logits, Gating gating, int k, const Tensor& bias, const Tensor& weights,
                const Tensor& experts, const Tensor& probs) {
  const Device dev = detail::check_router_fwd("router_fwd", logits, k, bias, weights, experts, probs);
  MOE_DISPATCH(router_fwd, dev, logits, gating, k, bias, weights, experts, probs);
}

void router_bwd(const Tensor& logits, Gating gating, const Tensor& experts, const Tensor& dweights,
                const Tensor& dprobs, const Tensor& dlogits) {
  const Device dev = detail::check_router_bwd("router_bwd", logits, experts, dweights, dprobs, dlogits);
  MOE_DISPATCH(router_bwd, dev, logits, gating, experts, dweights, dprobs, dlogits);
}

void moe_aux_loss_fwd(const Tensor& probs, const Tensor& counts, int k, int64_t num_tokens, const Tensor& loss) {
  constexpr std::string_view op = "moe_aux_loss_fwd";
  const Device dev = check_same_device(op, {{"probs", probs}, {"counts", counts}, {"loss", loss}});
  check_logits(op, {"probs", probs});
  check_k(op, k, probs.dim(1));
  check_num_tokens(op, num_tokens, {"probs", probs});
  check_dtype(op, {"counts", counts}, DType::kI64);
  check_shape(op, {"counts", counts}, Shape{probs.dim(1)}, {"probs", probs});
  check_loss(op, loss, {"probs", probs});
  MOE_DISPATCH(moe_aux_loss_fwd, dev, probs, counts, k, num_tokens, loss);
}

void moe_aux_loss_bwd(const Tensor& probs, const Tensor& counts, int k, int64_t num_tokens, float scale,
                      const Tensor& dprobs) {
  constexpr std::string_view op = "moe_aux_loss_bwd";
  const Device dev = check_same_device(op, {{"probs", probs}, {"counts", counts}, {"dprobs", dprobs}});
  check_logits(op, {"probs", probs});
  check_k(op, k, probs.dim(1));
  check_num_tokens(op, num_tokens, {"probs", probs});
  check_dtype(op, {"counts", counts}, DType::kI64);
  check_shape(op, {"counts", counts}, Shape{probs.dim(1)}, {"probs", probs});
  check_dtype(op, {"dprobs", dprobs}, DType::kF32);
  check_same_shape(op, {"dprobs", dprobs}, {"probs", probs});
  MOE_DISPATCH(moe_aux_loss_bwd, dev, probs, counts, k, num_tokens, scale, dprobs);
}

void router_z_loss_fwd(const Tensor& logits, int64_t num_tokens, const Tensor& loss) {
  constexpr std::string_view op = "router_z_loss_fwd";
  const Device dev = check_same_device(op, {{"logits", logits}, {"loss", loss}});
  check_logits(op, {"logits", logits});
  check_num_tokens(op, num_tokens, {"logits", logits});
  check_loss(op, loss, {"logits", logits});
  MOE_DISPATCH(router_z_loss_fwd, dev, logits, num_tokens, loss);
}

void router_z_loss_bwd(const Tensor& logits, int64_t num_tokens, float scale, const Tensor& dlogits) {
  constexpr std::string_view op = "router_z_loss_bwd";
  const Device dev = check_same_device(op, {{"logits", logits}, {"dlogits", dlogits}});
  check_logits(op, {"logits", logits});
  check_num_tokens(op, num_tokens, {"logits", logits});
  check_dtype(op, {"dlogits", dlogits}, DType::kF32);
  check_same_shape(op, {"dlogits", dlogits}, {"logits", logits});
  MOE_DISPATCH(router_z_loss_bwd, dev, logits, num_tokens, scale, dlogits);
}

// ---- the router with its losses in one pass ------------------------------------------------------

RouterStats RouterStats::allocate(int64_t n, int64_t e, Device device) {
  return {Tensor::empty({e}, DType::kF32, device), Tensor::empty({e}, DType::kI64, device),
          Tensor::empty({n}, DType::kF32, device)};
}

namespace {

// stats as RouterStats::allocate(n, e, device) makes it, on ref's device.
void check_stats(std::string_view op, const RouterStats& stats, int64_t n, int64_t e, NamedTensor ref) {
  MOE_CHECK(stats.prob_mass.defined() && stats.selected.defined() && stats.lse.defined(),
            "{}: stats has undefined tensors; expected RouterStats::allocate({}, {}, ...)", op, n, e);
  check_same_device(op, {ref, {"stats.prob_mass", stats.prob_mass}, {"stats.selected", stats.selected},
                         {"stats.lse", stats.lse}});
  check_dtype(op, {"stats.prob_mass", stats.prob_mass}, DType::kF32);
  check_shape(op, {"stats.prob_mass", stats.prob_mass}, Shape{e}, ref);
  check_dtype(op, {"stats.selected", stats.selected}, DType::kI64);
  check_shape(op, {"stats.selected", stats.selected}, Shape{e}, ref);
  check_dtype(op, {"stats.lse", stats.lse}, DType::kF32);
  check_shape(op, {"stats.lse", stats.lse}, Shape{n}, ref);
}

void check_stats_tokens(std::string_view op, int64_t num_tokens, int64_t n) {
  MOE_CHECK(num_tokens >= n, "{}: num_tokens={} must be >= the {} rows the statistics cover", op, num_tokens, n);
}

// The (N, E) sizes of stats: E from prob_mass, N from lse (0 where undefined; check_stats says so).
std::pair<int64_t, int64_t> stats_sizes(const RouterStats& stats) {
  return {stats.lse.defined() ? stats.lse.numel() : 0, stats.prob_mass.defined() ? stats.prob_mass.numel() : 0};
}

}  // namespace

void router_fwd_with_stats(const Tensor& logits, Gating gating, int k, const Tensor& bias, const Tensor& weights,
                           const Tensor& experts, const Tensor& probs, const RouterStats& stats) {
  constexpr std::string_view op = "router_fwd_with_stats";
  const Device dev = detail::check_router_fwd(op, logits, k, bias, weights, experts, probs);
  check_stats(op, stats, logits.dim(0), logits.dim(1), {"logits", logits});
  MOE_DISPATCH(router_fwd_with_stats, dev, logits, gating, k, bias, weights, experts, probs, stats);
}

void moe_aux_loss_fwd_from_stats(const RouterStats& stats, const Tensor& counts, int k, int64_t num_tokens,
                                 const Tensor& loss) {
  constexpr std::string_view op = "moe_aux_loss_fwd_from_stats";
  const auto [n, e] = stats_sizes(stats);
  check_stats(op, stats, n, e, {"stats.prob_mass", stats.prob_mass});
  const Device dev = check_same_device(op, {{"stats.prob_mass", stats.prob_mass}, {"counts", counts}, {"loss", loss}});
  check_dtype(op, {"counts", counts}, DType::kI64);
  check_shape(op, {"counts", counts}, Shape{e}, {"stats.prob_mass", stats.prob_mass});
  check_loss(op, loss, {"stats.prob_mass", stats.prob_mass});
  check_k(op, k, e);
  check_stats_tokens(op, num_tokens, n);
  MOE_DISPATCH(moe_aux_loss_fwd_from_stats, dev, stats, counts, k, num_tokens, loss);
}

void router_z_loss_fwd_from_stats(const RouterStats& stats, int64_t num_tokens, const Tensor& loss) {
  constexpr std::string_view op = "router_z_loss_fwd_from_stats";
  const auto [n, e] = stats_sizes(stats);
  check_stats(op, stats, n, e, {"stats.lse", stats.lse});
  const Device dev = check_same_device(op, {{"stats.lse", stats.lse}, {"loss", loss}});
  check_loss(op, loss, {"stats.lse", stats.lse});
  check_stats_tokens(op, num_tokens, n);
  MOE_DISPATCH(router_z_loss_fwd_from_stats, dev, stats, num_tokens, loss);
}

void router_bwd_fused(const Tensor& logits, Gating gating, const Tensor& experts, const Tensor& dweights,
                      const Tensor& dprobs, const RouterLossGrads& losses, const Tensor& dlogits) {
  constexpr std::string_view op = "router_bwd_fused";
  const Device dev = detail::check_router_bwd(op, logits, experts, dweights, dprobs, dlogits);
  const int64_t n = logits.dim(0), e = logits.dim(1);
  if (losses.counts.defined() || losses.lse.defined()) check_stats_tokens(op, losses.num_tokens, n);
  if (losses.counts.defined()) {
    check_same_device(op, {{"logits", logits}, {"losses.counts", losses.counts}});
    check_dtype(op, {"losses.counts", losses.counts}, DType::kI64);
    check_shape(op, {"losses.counts", losses.counts}, Shape{e}, {"logits", logits});
    MOE_CHECK(losses.k >= 1 && losses.k <= e, "{}: losses.k={} must be in [1, E={}]", op, losses.k, e);
  }
  if (losses.lse.defined()) {
    check_same_device(op, {{"logits", logits}, {"losses.lse", losses.lse}});
    check_dtype(op, {"losses.lse", losses.lse}, DType::kF32);
    check_shape(op, {"losses.lse", losses.lse}, Shape{n}, {"logits", logits});
  }
  MOE_DISPATCH(router_bwd_fused, dev, logits, gating, experts, dweights, dprobs, losses, dlogits);
}

void moe_plan(const Tensor& experts, int num_experts, const Tensor& positions, const Tensor& offsets) {
  constexpr std::string_view op = "moe_plan";
  const Device dev = check_same_device(op, {{"experts", experts}, {"positions", positions}, {"offsets", offsets}});
  check_dtype(op, {"experts", experts}, DType::kI32);
  check_ndim(op, {"experts", experts}, 2);
  MOE_CHECK(num_experts >= 1, "{}: num_experts={} must be >= 1", op, num_experts);
  MOE_CHECK(experts.numel() <= std::numeric_limits<int32_t>::max(),
            "{}: experts has shape {}: {} token copies do not fit the i32 positions", op, experts.shape().str(),
            experts.numel());
  check_dtype(op, {"positions", positions}, DType::kI32);
  check_same_shape(op, {"positions", positions}, {"experts", experts});
  check_dtype(op, {"offsets", offsets}, DType::kI64);
  MOE_CHECK(offsets.shape() == Shape{int64_t{num_experts} + 1},
            "{}: offsets has shape {} but num_experts={}; expected offsets of shape ({})", op, offsets.shape().str(),
            num_experts, int64_t{num_experts} + 1);
  MOE_DISPATCH(moe_plan, dev, experts, num_experts, positions, offsets);
}

void moe_apply_capacity(const Tensor& experts, int64_t capacity, const Tensor& base, const Tensor& dispatch) {
  constexpr std::string_view op = "moe_apply_capacity";
  const Device dev = check_same_device(op, {{"experts", experts}, {"base", base}, {"dispatch", dispatch}});
  check_dtype(op, {"experts", experts}, DType::kI32);
  check_ndim(op, {"experts", experts}, 2);
  MOE_CHECK(capacity >= 0, "{}: capacity={} must be >= 0", op, capacity);
  check_dtype(op, {"base", base}, DType::kI64);
  check_ndim(op, {"base", base}, 2);
  MOE_CHECK(base.dim(0) == experts.dim(1) && base.dim(1) >= 1,
            "{}: base has shape {} but experts has shape {}; expected base of shape ({}, E)", op, base.shape().str(),
            experts.shape().str(), experts.dim(1));
  check_dtype(op, {"dispatch", dispatch}, DType::kI32);
  check_same_shape(op, {"dispatch", dispatch}, {"experts", experts});
  MOE_DISPATCH(moe_apply_capacity, dev, experts, capacity, base, dispatch);
}

void moe_permute_fwd(const Tensor& x, const Tensor& positions, const Tensor& out) {
  constexpr std::string_view op = "moe_permute_fwd";
  const Device dev = check_same_device(op, {{"x", x}, {"positions", positions}, {"out", out}});
  detail::check_float(op, {"x", x});
  check_ndim(op, {"x", x}, 2);
  check_positions(op, positions);
  check_shape(op, {"positions", positions}, Shape{x.dim(0), positions.dim(1)}, {"x", x});
  check_copy_rows(op, {"out", out}, positions, x.dim(1), {"x", x});
  detail::check_same_dtype(op, {"out", out}, {"x", x});
  const Widened wx(x, Widened::kIn), wo(out, Widened::kOut);
  MOE_DISPATCH(moe_permute_fwd, dev, wx.f32(), positions, wo.f32());
  wo.finish();
}

void moe_permute_bwd(const Tensor& dout, const Tensor& positions, const Tensor& dx) {
  constexpr std::string_view op = "moe_permute_bwd";
  const Device dev = check_same_device(op, {{"dout", dout}, {"positions", positions}, {"dx", dx}});
  check_positions(op, positions);
  detail::check_float(op, {"dout", dout});
  check_ndim(op, {"dout", dout}, 2);
  check_copy_rows(op, {"dout", dout}, positions, dout.dim(1), {"dout", dout});
  detail::check_same_dtype(op, {"dx", dx}, {"dout", dout});
  check_shape(op, {"dx", dx}, Shape{positions.dim(0), dout.dim(1)}, {"dout", dout});
  const Widened wd(dout, Widened::kIn), wx(dx, Widened::kOut);
  MOE_DISPATCH(moe_permute_bwd, dev, wd.f32(), positions, wx.f32());
  wx.finish();
}

namespace {
// The inputs both unpermute ops share: y (M, C) expert outputs, positions and weights (N, K).
void check_combine_inputs(std::string_view op, const Tensor& y, const Tensor& positions, const Tensor& weights) {
  check_positions(op, positions);
  check_dtype(op, {"weights", weights}, DType::kF32);
  check_same_shape(op, {"weights", weights}, {"positions", positions});
  detail::check_float(op, {"y", y});
  check_ndim(op, {"y", y}, 2);
  check_copy_rows(op, {"y", y}, positions, y.dim(1), {"y", y});
}
}  // namespace

void moe_unpermute_fwd(const Tensor& y, const Tensor& positions, const Tensor& weights, const Tensor& out) {
  constexpr std::string_view op = "moe_unpermute_fwd";
  const Device dev =
      check_same_device(op, {{"y", y}, {"positions", positions}, {"weights", weights}, {"out", out}});
  check_combine_inputs(op, y, positions, weights);
  detail::check_same_dtype(op, {"out", out}, {"y", y});
  check_shape(op, {"out", out}, Shape{positions.dim(0), y.dim(1)}, {"y", y});
  const Widened wy(y, Widened::kIn), wo(out, Widened::kOut);
  MOE_DISPATCH(moe_unpermute_fwd, dev, wy.f32(), positions, weights, wo.f32());
  wo.finish();
}

void moe_unpermute_bwd(const Tensor& y, const Tensor& positions, const Tensor& weights, const Tensor& dout,
                       const Tensor& dy, const Tensor& dweights) {
  constexpr std::string_view op = "moe_unpermute_bwd";
  const Device dev = check_same_device(op, {{"y", y}, {"positions", positions}, {"weights", weights},
                                            {"dout", dout}, {"dy", dy}, {"dweights", dweights}});
  check_combine_inputs(op, y, positions, weights);
  detail::check_same_dtype(op, {"dout", dout}, {"y", y});
  check_shape(op, {"dout", dout}, Shape{positions.dim(0), y.dim(1)}, {"y", y});
  detail::check_same_dtype(op, {"dy", dy}, {"y", y});
  check_same_shape(op, {"dy", dy}, {"y", y});
  check_dtype(op, {"dweights", dweights}, DType::kF32);
  check_same_shape(op, {"dweights", dweights}, {"positions", positions});
  const Widened wy(y, Widened::kIn), wd(dout, Widened::kIn), wdy(dy, Widened::kOut);
  MOE_DISPATCH(moe_unpermute_bwd, dev, wy.f32(), positions, weights, wd.f32(), wdy.f32(), dweights);
  wdy.finish();
}

namespace {

// x (M, Cin), w (E, Cout, Cin), offsets (E+1) i64; their values are checked by the kernel.
void check_grouped_gemm_inputs(std::string_view op, const Tensor& x, const Tensor& w, const Tensor& offsets) {
  detail::check_float(op, {"x", x});
  check_ndim(op, {"x", x}, 2);
  detail::check_same_dtype(op, {"w", w}, {"x", x});
  check_ndim(op, {"w", w}, 3);
  check_shape(op, {"w", w}, Shape{w.dim(0), w.dim(1), x.dim(1)}, {"x", x});
  check_dtype(op, {"offsets", offsets}, DType::kI64);
  check_shape(op, {"offsets", offsets}, Shape{w.dim(0) + 1}, {"w", w});
}

}  // namespace

void grouped_gemm_fwd(const Tensor& x, const Tensor& w, const Tensor& offsets, const Tensor& out) {
  constexpr std::string_view op = "grouped_gemm_fwd";
  const Device dev = check_same_device(op, {{"x", x}, {"w", w}, {"offsets", offsets}, {"out", out}});
  check_grouped_gemm_inputs(op, x, w, offsets);
  detail::check_same_dtype(op, {"out", out}, {"x", x});
  check_shape(op, {"out", out}, Shape{x.dim(0), w.dim(1)}, {"w", w});
  const Widened wx(x, Widened::kIn), ww(w, Widened::kIn), wo(out, Widened::kOut);
  MOE_DISPATCH(grouped_gemm_fwd, dev, wx.f32(), ww.f32(), offsets, wo.f32());
  wo.finish();
}

void grouped_gemm_bwd(const Tensor& x, const Tensor& w, const Tensor& offsets, const Tensor& dout, const Tensor& dx,
                      const Tensor& dw) {
  constexpr std::string_view op = "grouped_gemm_bwd";
  const Device dev = check_same_device(
      op, {{"x", x}, {"w", w}, {"offsets", offsets}, {"dout", dout}, {"dx", dx}, {"dw", dw}});
  check_grouped_gemm_inputs(op, x, w, offsets);
  detail::check_same_dtype(op, {"dout", dout}, {"x", x});
  check_shape(op, {"dout", dout}, Shape{x.dim(0), w.dim(1)}, {"w", w});
  detail::check_same_dtype(op, {"dx", dx}, {"x", x});
  check_same_shape(op, {"dx", dx}, {"x", x});
  detail::check_float(op, {"dw", dw});  // f32 (mixed precision's fp32 gradients) or x's dtype
  if (dw.dtype() != DType::kF32) detail::check_same_dtype(op, {"dw", dw}, {"x", x});
  check_same_shape(op, {"dw", dw}, {"w", w});
  const Widened wx(x, Widened::kIn), ww(w, Widened::kIn), wd(dout, Widened::kIn), wdx(dx, Widened::kOut),
      wdw(dw, Widened::kInOut);
  MOE_DISPATCH(grouped_gemm_bwd, dev, wx.f32(), ww.f32(), offsets, wd.f32(), wdx.f32(), wdw.f32());
  wdx.finish();
  wdw.finish();
}

}  // namespace moeforge::ops
