#include "models/attention.h"

#include <cmath>

#include <fmt/format.h>

namespace moeforge {

namespace {
// Output projections get the GPT-2 / Megatron scaled init std / sqrt(2 L): each layer adds two
// residual branches, so this keeps the residual stream's variance independent of depth.
float output_std(const ModelConfig& cfg) { return cfg.init_std / std::sqrt(2.0f * static_cast<float>(cfg.n_layers)); }
}  // namespace

AttentionBlock::AttentionBlock(const ModelConfig& cfg, ParamRegistry& reg, int layer) : cfg_(cfg) {
  const std::string p = fmt::format("layers.{}.", layer);
  const int64_t C = cfg.dim, HD = cfg.n_heads * cfg.head_dim, KD = cfg.n_kv_heads * cfg.head_dim;
  norm_ = &reg.add({.name = p + "attn_norm.weight", .global_shape = {C}, .init = ParamInit::kOnes, .weight_decay = false});
  wq_ = &reg.add({.name = p + "attn.wq", .global_shape = {HD, C}, .shard_dim = 0, .shard_group = ShardGroup::kTP,
                  .init_std = cfg.init_std});
  wk_ = &reg.add({.name = p + "attn.wk", .global_shape = {KD, C}, .shard_dim = 0, .shard_group = ShardGroup::kTP,
                  .init_std = cfg.init_std});
  wv_ = &reg.add({.name = p + "attn.wv", .global_shape = {KD, C}, .shard_dim = 0, .shard_group = ShardGroup::kTP,
                  .init_std = cfg.init_std});
  wo_ = &reg.add({.name = p + "attn.wo", .global_shape = {C, HD}, .shard_dim = 1, .shard_group = ShardGroup::kTP,
                  .init_std = output_std(cfg)});
}

void AttentionBlock::forward(const Tensor& h_in, const Tensor& h_out, AttentionActs& a) const {
  const int64_t B = h_in.dim(0), T = h_in.dim(1), C = cfg_.dim, N = B * T;
  const int64_t H = cfg_.n_heads, Hkv = cfg_.n_kv_heads, D = cfg_.head_dim;
  a.h_in = h_in;
  a.xn = Tensor::empty({N, C}, DType::kF32);
  a.rstd = Tensor::empty({N}, DType::kF32);
  ops::rmsnorm_fwd(h_in.reshape({N, C}), norm_->value, cfg_.norm_eps, a.xn, a.rstd);

  a.q = Tensor::empty({B, T, H, D}, DType::kF32);
  a.k = Tensor::empty({B, T, Hkv, D}, DType::kF32);
  a.v = Tensor::empty({B, T, Hkv, D}, DType::kF32);
  ops::gemm(a.xn, false, wq_->value, true, a.q.reshape({N, H * D}));
  ops::gemm(a.xn, false, wk_->value, true, a.k.reshape({N, Hkv * D}));
  ops::gemm(a.xn, false, wv_->value, true, a.v.reshape({N, Hkv * D}));
  ops::rope_fwd(a.q, cfg_.rope_theta, a.q);
  ops::rope_fwd(a.k, cfg_.rope_theta, a.k);

  a.out = Tensor::empty({B, T, H, D}, DType::kF32);
  a.lse = Tensor::empty({B, H, T}, DType::kF32);
  ops::attention_fwd(a.q, a.k, a.v, 1.0f / std::sqrt(static_cast<float>(D)), a.out, a.lse);

  const Tensor y = h_out.reshape({N, C});
  ops::gemm(a.out.reshape({N, H * D}), false, wo_->value, true, y);
  ops::add_(y, h_in.reshape({N, C}));
}

void AttentionBlock::backward(const Tensor& dh_out, const Tensor& dh_in, const AttentionActs& a) const {
  const int64_t B = a.q.dim(0), T = a.q.dim(1), C = cfg_.dim, N = B * T;
  const int64_t H = cfg_.n_heads, Hkv = cfg_.n_kv_heads, D = cfg_.head_dim;
  const Tensor dy = dh_out.reshape({N, C});

  // y = out · woᵀ
  const Tensor dout = Tensor::empty({B, T, H, D}, DType::kF32);
  ops::gemm(dy, false, wo_->value, false, dout.reshape({N, H * D}));
  ops::gemm(dy, true, a.out.reshape({N, H * D}), false, wo_->grad, /*accumulate=*/true);

  const Tensor dq = Tensor::empty({B, T, H, D}, DType::kF32);
  const Tensor dk = Tensor::empty({B, T, Hkv, D}, DType::kF32);
  const Tensor dv = Tensor::empty({B, T, Hkv, D}, DType::kF32);
  ops::attention_bwd(a.q, a.k, a.v, a.out, a.lse, dout, 1.0f / std::sqrt(static_cast<float>(D)), dq, dk, dv);
  ops::rope_bwd(dq, cfg_.rope_theta, dq);
  ops::rope_bwd(dk, cfg_.rope_theta, dk);

  // q = xn · wqᵀ (and k, v): dxn = dq·wq + dk·wk + dv·wv; dw = dᵀ · xn
  const Tensor dxn = Tensor::empty({N, C}, DType::kF32);
  ops::gemm(dq.reshape({N, H * D}), false, wq_->value, false, dxn);
  ops::gemm(dk.reshape({N, Hkv * D}), false, wk_->value, false, dxn, /*accumulate=*/true);
  ops::gemm(dv.reshape({N, Hkv * D}), false, wv_->value, false, dxn, /*accumulate=*/true);
  ops::gemm(dq.reshape({N, H * D}), true, a.xn, false, wq_->grad, true);
  ops::gemm(dk.reshape({N, Hkv * D}), true, a.xn, false, wk_->grad, true);
  ops::gemm(dv.reshape({N, Hkv * D}), true, a.xn, false, wv_->grad, true);

  const Tensor dx = dh_in.reshape({N, C});
  ops::rmsnorm_bwd(a.h_in.reshape({N, C}), norm_->value, a.rstd, dxn, dx, norm_->grad);
  ops::add_(dx, dy);
}

}  // namespace moeforge
