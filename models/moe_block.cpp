#include "models/moe_block.h"

#include <cmath>

#include <fmt/format.h>

namespace moeforge {

MoeBlock::MoeBlock(const ModelConfig& cfg, ParamRegistry& reg, Comm& tp, int layer) : cfg_(cfg), tp_(tp) {
  const std::string p = fmt::format("layers.{}.", layer);
  const int64_t C = cfg.dim, E = cfg.n_experts, F = cfg.expert_hidden;
  const float out_std = cfg.init_std / std::sqrt(2.0f * static_cast<float>(cfg.n_layers));
  norm_ = &reg.add({.name = p + "moe_norm.weight", .global_shape = {C}, .init = ParamInit::kOnes, .weight_decay = false});
  router_ = &reg.add({.name = p + "moe.router", .global_shape = {E, C}, .init_std = cfg.init_std});
  w1_ = &reg.add({.name = p + "moe.experts.w1", .global_shape = {E, F, C}, .shard_dim = 0,
                  .shard_group = ShardGroup::kEP, .expert = true, .init_std = cfg.init_std});
  w3_ = &reg.add({.name = p + "moe.experts.w3", .global_shape = {E, F, C}, .shard_dim = 0,
                  .shard_group = ShardGroup::kEP, .expert = true, .init_std = cfg.init_std});
  w2_ = &reg.add({.name = p + "moe.experts.w2", .global_shape = {E, C, F}, .shard_dim = 0,
                  .shard_group = ShardGroup::kEP, .expert = true, .init_std = out_std});
  if (cfg.n_shared_experts > 0) {
    const int64_t SF = cfg.n_shared_experts * F;
    // Whole on every rank, like the routed experts: they run on this rank's token rows.
    s_w1_ = &reg.add({.name = p + "moe.shared.w1", .global_shape = {SF, C}, .init_std = cfg.init_std});
    s_w3_ = &reg.add({.name = p + "moe.shared.w3", .global_shape = {SF, C}, .init_std = cfg.init_std});
    s_w2_ = &reg.add({.name = p + "moe.shared.w2", .global_shape = {C, SF}, .init_std = out_std});
  }
}

namespace {
double scalar(const Tensor& t) { return static_cast<double>(t.to_floats().at(0)); }
}  // namespace

void MoeBlock::forward(const Tensor& h_in, const Tensor& h_out, MoeActs& a) const {
  const int64_t N = h_in.dim(0), C = cfg_.dim;
  const int64_t E = cfg_.n_experts, K = cfg_.top_k, F = cfg_.expert_hidden, M = N * K;
  a.h_in = h_in;
  a.xn = Tensor::empty({N, C}, DType::kF32);
  a.rstd = Tensor::empty({N}, DType::kF32);
  ops::rmsnorm_fwd(h_in, norm_->value, cfg_.norm_eps, a.xn, a.rstd);

  // Routing.
  a.logits = Tensor::empty({N, E}, DType::kF32);
  ops::gemm(a.xn, false, router_->value, true, a.logits);
  a.weights = Tensor::empty({N, K}, DType::kF32);
  a.experts = Tensor::empty({N, K}, DType::kI32);
  a.probs = Tensor::empty({N, E}, DType::kF32);
  ops::router_fwd(a.logits, cfg_.gating, static_cast<int>(K), Tensor(), a.weights, a.experts, a.probs);
  a.positions = Tensor::empty({N, K}, DType::kI32);
  a.offsets = Tensor::empty({E + 1}, DType::kI64);
  ops::moe_plan(a.experts, static_cast<int>(E), a.positions, a.offsets);
  a.counts = Tensor::empty({E}, DType::kI64);
  for (int64_t e = 0; e < E; ++e)
    a.counts.data<int64_t>()[e] = a.offsets.data<int64_t>()[e + 1] - a.offsets.data<int64_t>()[e];
  tp_.all_reduce(a.counts);
  a.tokens = N * tp_.size();

  const Tensor loss = Tensor::empty({1}, DType::kF32);
  ops::moe_aux_loss_fwd(a.probs, a.counts, static_cast<int>(K), a.tokens, loss);
  a.aux = scalar(loss);
  ops::router_z_loss_fwd(a.logits, a.tokens, loss);
  a.z = scalar(loss);

  // Routed experts.
  a.xp = Tensor::empty({M, C}, DType::kF32);
  ops::moe_permute_fwd(a.xn, a.positions, a.xp);
  a.gate = Tensor::empty({M, F}, DType::kF32);
  a.up = Tensor::empty({M, F}, DType::kF32);
  a.act = Tensor::empty({M, F}, DType::kF32);
  a.y = Tensor::empty({M, C}, DType::kF32);
  ops::grouped_gemm_fwd(a.xp, w1_->value, a.offsets, a.gate);
  ops::grouped_gemm_fwd(a.xp, w3_->value, a.offsets, a.up);
  ops::swiglu_fwd(a.gate, a.up, a.act);
  ops::grouped_gemm_fwd(a.act, w2_->value, a.offsets, a.y);

  const Tensor& out = h_out;
  ops::moe_unpermute_fwd(a.y, a.positions, a.weights, out);

  if (s_w1_) {
    const int64_t SF = s_w1_->value.dim(0);
    a.s_gate = Tensor::empty({N, SF}, DType::kF32);
    a.s_up = Tensor::empty({N, SF}, DType::kF32);
    a.s_act = Tensor::empty({N, SF}, DType::kF32);
    ops::gemm(a.xn, false, s_w1_->value, true, a.s_gate);
    ops::gemm(a.xn, false, s_w3_->value, true, a.s_up);
    ops::swiglu_fwd(a.s_gate, a.s_up, a.s_act);
    ops::gemm(a.s_act, false, s_w2_->value, true, out, /*accumulate=*/true);
  }
  ops::add_(out, h_in);
}

void MoeBlock::backward(const Tensor& dh_out, const Tensor& dh_in, const MoeActs& a, float loss_scale) const {
  const int64_t N = a.xn.dim(0), C = cfg_.dim;
  const int64_t E = cfg_.n_experts, K = cfg_.top_k, F = cfg_.expert_hidden, M = N * K;
  const Tensor& dy_out = dh_out;
  const Tensor dxn = Tensor::empty({N, C}, DType::kF32);

  // Combine: out = sum_k w[n,k] y[pos(n,k)].
  const Tensor dy = Tensor::empty({M, C}, DType::kF32);
  const Tensor dweights = Tensor::empty({N, K}, DType::kF32);
  ops::moe_unpermute_bwd(a.y, a.positions, a.weights, dy_out, dy, dweights);

  // Experts, in reverse: y = act · w2ᵀ, act = swiglu(gate, up), gate = xp · w1ᵀ, up = xp · w3ᵀ.
  const Tensor dact = Tensor::empty({M, F}, DType::kF32);
  ops::grouped_gemm_bwd(a.act, w2_->value, a.offsets, dy, dact, w2_->grad);
  const Tensor dgate = Tensor::empty({M, F}, DType::kF32);
  const Tensor dup = Tensor::empty({M, F}, DType::kF32);
  ops::swiglu_bwd(a.gate, a.up, dact, dgate, dup);
  const Tensor dxp = Tensor::empty({M, C}, DType::kF32);
  const Tensor dxp_up = Tensor::empty({M, C}, DType::kF32);
  ops::grouped_gemm_bwd(a.xp, w1_->value, a.offsets, dgate, dxp, w1_->grad);
  ops::grouped_gemm_bwd(a.xp, w3_->value, a.offsets, dup, dxp_up, w3_->grad);
  ops::add_(dxp, dxp_up);
  ops::moe_permute_bwd(dxp, a.positions, dxn);

  // Router: the combine weights' gradient, the aux loss through probs, the z-loss on logits.
  Tensor dprobs;  // undefined when the aux loss is off: router_bwd then skips that path
  if (cfg_.aux_loss_coef > 0.0f) {
    dprobs = Tensor::empty({N, E}, DType::kF32);
    ops::moe_aux_loss_bwd(a.probs, a.counts, static_cast<int>(K), a.tokens, loss_scale * cfg_.aux_loss_coef, dprobs);
  }
  const Tensor dlogits = Tensor::empty({N, E}, DType::kF32);
  ops::router_bwd(a.logits, cfg_.gating, a.experts, dweights, dprobs, dlogits);
  if (cfg_.z_loss_coef > 0.0f) ops::router_z_loss_bwd(a.logits, a.tokens, loss_scale * cfg_.z_loss_coef, dlogits);
  ops::gemm(dlogits, false, router_->value, false, dxn, /*accumulate=*/true);
  ops::gemm(dlogits, true, a.xn, false, router_->grad, /*accumulate=*/true);

  if (s_w1_) {
    const int64_t SF = s_w1_->value.dim(0);
    const Tensor ds_act = Tensor::empty({N, SF}, DType::kF32);
    ops::gemm(dy_out, false, s_w2_->value, false, ds_act);
    ops::gemm(dy_out, true, a.s_act, false, s_w2_->grad, true);
    const Tensor ds_gate = Tensor::empty({N, SF}, DType::kF32);
    const Tensor ds_up = Tensor::empty({N, SF}, DType::kF32);
    ops::swiglu_bwd(a.s_gate, a.s_up, ds_act, ds_gate, ds_up);
    ops::gemm(ds_gate, false, s_w1_->value, false, dxn, true);
    ops::gemm(ds_up, false, s_w3_->value, false, dxn, true);
    ops::gemm(ds_gate, true, a.xn, false, s_w1_->grad, true);
    ops::gemm(ds_up, true, a.xn, false, s_w3_->grad, true);
  }

  ops::rmsnorm_bwd(a.h_in, norm_->value, a.rstd, dxn, dh_in, norm_->grad);
  ops::add_(dh_in, dy_out);
}

}  // namespace moeforge
