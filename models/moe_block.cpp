#include "models/moe_block.h"

#include <algorithm>
#include <cmath>

#include <fmt/format.h>

#include "models/device_tensors.h"

namespace moeforge {

MoeBlock::MoeBlock(const ModelConfig& cfg, ParamRegistry& reg, const ProcessGrid& grid, int layer)
    : cfg_(cfg), tp_(grid.tp()), ep_(grid.ep()) {
  const std::string p = fmt::format("layers.{}.", layer);
  const int64_t C = cfg.dim, E = cfg.n_experts, F = cfg.expert_hidden;
  const float out_std = cfg.init_std / std::sqrt(2.0f * static_cast<float>(cfg.n_layers));
  norm_ = &reg.add({.name = p + "moe_norm.weight", .global_shape = {C}, .init = ParamInit::kOnes, .weight_decay = false});
  router_ = &reg.add({.name = p + "moe.router", .global_shape = {E, C}, .init_std = cfg.init_std});
  if (cfg.expert_bias_update_rate > 0.0f) {
    bias_ = &reg.add({.name = p + "moe.expert_bias", .global_shape = {E}, .init = ParamInit::kZeros,
                      .weight_decay = false, .trainable = false});
  }
  w1_ = &reg.add({.name = p + "moe.experts.w1", .global_shape = {E, F, C}, .shard_dim = 0,
                  .shard_group = ShardGroup::kEP, .expert = true, .init_std = cfg.init_std});
  w3_ = &reg.add({.name = p + "moe.experts.w3", .global_shape = {E, F, C}, .shard_dim = 0,
                  .shard_group = ShardGroup::kEP, .expert = true, .init_std = cfg.init_std});
  w2_ = &reg.add({.name = p + "moe.experts.w2", .global_shape = {E, C, F}, .shard_dim = 0,
                  .shard_group = ShardGroup::kEP, .expert = true, .init_std = out_std});
  if (cfg.n_shared_experts > 0) {
    const int64_t SF = cfg.n_shared_experts * F;
    // Whole on every rank: they run on this rank's token rows.
    s_w1_ = &reg.add({.name = p + "moe.shared.w1", .global_shape = {SF, C}, .init_std = cfg.init_std});
    s_w3_ = &reg.add({.name = p + "moe.shared.w3", .global_shape = {SF, C}, .init_std = cfg.init_std});
    s_w2_ = &reg.add({.name = p + "moe.shared.w2", .global_shape = {C, SF}, .init_std = out_std});
  }
}

namespace {
// A 1-element loss read on the host (a copy from a GPU).
double scalar(const Tensor& t) { return static_cast<double>(host(t).to_floats().at(0)); }
}  // namespace

Tensor MoeBlock::apply_capacity(MoeActs& a) const {
  const int64_t N = a.experts.dim(0), K = cfg_.top_k, E = cfg_.n_experts;
  const int tp = tp_.size(), me = tp_.rank();
  const Device dev = a.experts.device();
  // The ranking is computed on the host from the selected experts (a copy from a GPU); the
  // counts travel over TP as host tensors.
  const Tensor experts = host(a.experts);
  // counts (tp, K, E): copies per (slot, expert) of every TP rank's rows.
  const Tensor mine = Tensor::zeros({K, E}, DType::kI64);
  const int32_t* ex = experts.data<int32_t>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) ++mine.data<int64_t>()[k * E + ex[n * K + k]];
  Tensor all = mine;
  if (tp > 1) {
    all = Tensor::empty({tp * K, E}, DType::kI64);
    tp_.all_gather(mine, all);
  }
  const int64_t* c = all.data<int64_t>();
  const auto count = [&](int r, int64_t k, int64_t e) { return c[(r * K + k) * E + e]; };
  // base[k, e]: copies of e ranked before this rank's slot-k copies (earlier slots of every rank,
  // then slot k of lower TP ranks).
  const Tensor base = Tensor::zeros({K, E}, DType::kI64);
  const Tensor counts = Tensor::zeros({E}, DType::kI64);
  for (int64_t e = 0; e < E; ++e) {
    int64_t before = 0;
    for (int64_t k = 0; k < K; ++k) {
      int64_t slot_total = 0, lower = 0;
      for (int r = 0; r < tp; ++r) {
        slot_total += count(r, k, e);
        if (r < me) lower += count(r, k, e);
      }
      base.data<int64_t>()[k * E + e] = before + lower;
      before += slot_total;
    }
    counts.data<int64_t>()[e] = before;
  }
  a.counts_host = counts;
  a.counts = on_device(counts, dev);
  const double exact = static_cast<double>(cfg_.capacity_factor) * static_cast<double>(a.tokens * K) /
                       static_cast<double>(E);
  const auto capacity = static_cast<int64_t>(std::ceil(exact));
  a.dropped = 0;
  for (int64_t e = 0; e < E; ++e) a.dropped += std::max<int64_t>(0, counts.data<int64_t>()[e] - capacity);
  const Tensor dispatch = Tensor::empty({N, K}, DType::kI32, dev);
  ops::moe_apply_capacity(a.experts, capacity, on_device(base, dev), dispatch);
  return dispatch;
}

void MoeBlock::forward(const Tensor& h_in, const Tensor& h_out, MoeActs& a) const {
  const int64_t N = h_in.dim(0), C = cfg_.dim;
  const int64_t E = cfg_.n_experts, K = cfg_.top_k, F = cfg_.expert_hidden;
  const Device dev = h_in.device();  // every activation lives where the input does
  const DType act = h_in.dtype();    // and has its dtype; routing stays f32
  a.h_in = h_in;
  a.xn = Tensor::empty({N, C}, act, dev);
  a.rstd = Tensor::empty({N}, DType::kF32, dev);
  ops::rmsnorm_fwd(h_in, norm_->compute, cfg_.norm_eps, a.xn, a.rstd);

  // Routing.
  a.logits = Tensor::empty({N, E}, DType::kF32, dev);
  ops::gemm(a.xn, false, router_->compute, true, a.logits);
  a.weights = Tensor::empty({N, K}, DType::kF32, dev);
  a.experts = Tensor::empty({N, K}, DType::kI32, dev);
  // The gating with the statistics both router losses need (one kernel on CUDA): probs is only
  // reduced into the per-expert mass, so it does not outlive the forward.
  const ops::RouterStats stats = ops::RouterStats::allocate(N, E, dev);
  ops::router_fwd_with_stats(a.logits, cfg_.gating, static_cast<int>(K), bias_ ? bias_->value : Tensor(), a.weights,
                             a.experts, Tensor::empty({N, E}, DType::kF32, dev), stats);
  a.lse = stats.lse;
  a.tokens = N * tp_.size();
  const Tensor dispatch = cfg_.capacity_factor > 0.0f ? apply_capacity(a) : a.experts;
  a.positions = Tensor::empty({N, K}, DType::kI32, dev);
  const Tensor offsets = Tensor::empty({E + 1}, DType::kI64, dev);
  ops::moe_plan(dispatch, static_cast<int>(E), a.positions, offsets);
  // The plan's group sizes size the buffers below and the EP exchange: read on the host.
  const Tensor offsets_host = host(offsets);
  const int64_t* off = offsets_host.data<int64_t>();
  if (cfg_.capacity_factor <= 0.0f) {  // dropless: the plan's counts, summed over the micro-batch
    const Tensor counts = Tensor::empty({E}, DType::kI64);
    for (int64_t e = 0; e < E; ++e) counts.data<int64_t>()[e] = off[e + 1] - off[e];
    tp_.all_reduce(counts);
    a.counts_host = counts;
    a.counts = on_device(counts, dev);
    a.dropped = 0;
  }

  const Tensor loss = Tensor::empty({1}, DType::kF32, dev);
  ops::moe_aux_loss_fwd_from_stats(stats, a.counts, static_cast<int>(K), a.tokens, loss);
  a.aux = scalar(loss);
  ops::router_z_loss_fwd_from_stats(stats, a.tokens, loss);
  a.z = scalar(loss);

  // Routed experts: permute, dispatch over EP, grouped SwiGLU, bring back, combine.
  const Tensor xp = Tensor::empty({off[E], C}, act, dev);
  ops::moe_permute_fwd(a.xn, a.positions, xp);
  a.plan = plan_dispatch(ep_, offsets);
  a.xl = to_experts(ep_, a.plan, xp);
  const int64_t R = a.xl.dim(0);
  a.gate = Tensor::empty({R, F}, act, dev);
  a.up = Tensor::empty({R, F}, act, dev);
  a.act = Tensor::empty({R, F}, act, dev);
  const Tensor yl = Tensor::empty({R, C}, act, dev);
  ops::grouped_gemm_fwd(a.xl, w1_->compute, a.plan.local_offsets, a.gate);
  ops::grouped_gemm_fwd(a.xl, w3_->compute, a.plan.local_offsets, a.up);
  ops::swiglu_fwd(a.gate, a.up, a.act);
  ops::grouped_gemm_fwd(a.act, w2_->compute, a.plan.local_offsets, yl);
  a.y = from_experts(ep_, a.plan, yl);

  const Tensor& out = h_out;
  ops::moe_unpermute_fwd(a.y, a.positions, a.weights, out);

  if (s_w1_) {
    const int64_t SF = s_w1_->compute.dim(0);
    a.s_gate = Tensor::empty({N, SF}, act, dev);
    a.s_up = Tensor::empty({N, SF}, act, dev);
    a.s_act = Tensor::empty({N, SF}, act, dev);
    ops::gemm(a.xn, false, s_w1_->compute, true, a.s_gate);
    ops::gemm(a.xn, false, s_w3_->compute, true, a.s_up);
    ops::swiglu_fwd(a.s_gate, a.s_up, a.s_act);
    ops::gemm(a.s_act, false, s_w2_->compute, true, out, /*accumulate=*/true);
  }
  ops::add_(out, h_in);
}

void MoeBlock::backward(const Tensor& dh_out, const Tensor& dh_in, const MoeActs& a, float loss_scale) const {
  const int64_t N = a.xn.dim(0), C = cfg_.dim;
  const int64_t E = cfg_.n_experts, K = cfg_.top_k, F = cfg_.expert_hidden;
  const int64_t R = a.xl.dim(0);
  const Device dev = dh_out.device();
  const DType act = dh_out.dtype();
  const Tensor& dy_out = dh_out;
  const Tensor dxn = Tensor::empty({N, C}, act, dev);

  // Combine: out = sum_k w[n,k] y[pos(n,k)] over the kept copies.
  const Tensor dy = Tensor::empty(a.y.shape(), act, dev);
  const Tensor dweights = Tensor::empty({N, K}, DType::kF32, dev);
  ops::moe_unpermute_bwd(a.y, a.positions, a.weights, dy_out, dy, dweights);

  // Experts, in reverse: y = act · w2ᵀ, act = swiglu(gate, up), gate = xl · w1ᵀ, up = xl · w3ᵀ,
  // with the EP exchange transposed around them.
  const Tensor dyl = to_experts(ep_, a.plan, dy);
  const Tensor dact = Tensor::empty({R, F}, act, dev);
  ops::grouped_gemm_bwd(a.act, w2_->compute, a.plan.local_offsets, dyl, dact, w2_->grad);
  const Tensor dgate = Tensor::empty({R, F}, act, dev);
  const Tensor dup = Tensor::empty({R, F}, act, dev);
  ops::swiglu_bwd(a.gate, a.up, dact, dgate, dup);
  const Tensor dxl = Tensor::empty({R, C}, act, dev);
  const Tensor dxl_up = Tensor::empty({R, C}, act, dev);
  ops::grouped_gemm_bwd(a.xl, w1_->compute, a.plan.local_offsets, dgate, dxl, w1_->grad);
  ops::grouped_gemm_bwd(a.xl, w3_->compute, a.plan.local_offsets, dup, dxl_up, w3_->grad);
  ops::add_(dxl, dxl_up);
  ops::moe_permute_bwd(from_experts(ep_, a.plan, dxl), a.positions, dxn);

  // Router: the combine weights' gradient, the aux loss through probs and the z-loss on logits, in
  // one op (one kernel on CUDA). A loss with coefficient 0 is left out.
  ops::RouterLossGrads losses;
  losses.num_tokens = a.tokens;
  if (cfg_.aux_loss_coef > 0.0f) {
    losses.counts = a.counts;
    losses.k = static_cast<int>(K);
    losses.aux_scale = loss_scale * cfg_.aux_loss_coef;
  }
  if (cfg_.z_loss_coef > 0.0f) {
    losses.lse = a.lse;
    losses.z_scale = loss_scale * cfg_.z_loss_coef;
  }
  const Tensor dlogits = Tensor::empty({N, E}, DType::kF32, dev);
  ops::router_bwd_fused(a.logits, cfg_.gating, a.experts, dweights, Tensor(), losses, dlogits);
  // The router's matmuls take dlogits in the activation dtype (a gemm's operands share theirs).
  Tensor dl = dlogits;
  if (act != DType::kF32) {
    dl = Tensor::empty({N, E}, act, dev);
    ops::cast(dlogits, dl);
  }
  ops::gemm(dl, false, router_->compute, false, dxn, /*accumulate=*/true);
  ops::gemm(dl, true, a.xn, false, router_->grad, /*accumulate=*/true);

  if (s_w1_) {
    const int64_t SF = s_w1_->compute.dim(0);
    const Tensor ds_act = Tensor::empty({N, SF}, act, dev);
    ops::gemm(dy_out, false, s_w2_->compute, false, ds_act);
    ops::gemm(dy_out, true, a.s_act, false, s_w2_->grad, true);
    const Tensor ds_gate = Tensor::empty({N, SF}, act, dev);
    const Tensor ds_up = Tensor::empty({N, SF}, act, dev);
    ops::swiglu_bwd(a.s_gate, a.s_up, ds_act, ds_gate, ds_up);
    ops::gemm(ds_gate, false, s_w1_->compute, false, dxn, true);
    ops::gemm(ds_up, false, s_w3_->compute, false, dxn, true);
    ops::gemm(ds_gate, true, a.xn, false, s_w1_->grad, true);
    ops::gemm(ds_up, true, a.xn, false, s_w3_->grad, true);
  }

  ops::rmsnorm_bwd(a.h_in, norm_->compute, a.rstd, dxn, dh_in, norm_->grad);
  ops::add_(dh_in, dy_out);
}

void MoeBlock::update_bias(const int64_t* load) {
  if (!bias_) return;
  const int64_t E = cfg_.n_experts;
  double mean = 0.0;
  for (int64_t e = 0; e < E; ++e) mean += static_cast<double>(load[e]);
  mean /= static_cast<double>(E);
  const Tensor bias = host(bias_->value);  // the bias itself on the CPU; a copy of a GPU's
  float* b = bias.data<float>();
  for (int64_t e = 0; e < E; ++e) {
    const double err = mean - static_cast<double>(load[e]);
    b[e] += cfg_.expert_bias_update_rate * static_cast<float>((err > 0.0) - (err < 0.0));
  }
  if (!bias_->value.device().is_cpu()) copy_across(bias, bias_->value);
}

}  // namespace moeforge
