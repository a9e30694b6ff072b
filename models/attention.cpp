#include "models/attention.h"

#include <cmath>

#include <fmt/format.h>

#include "parallel/sequence_parallel.h"

namespace moeforge {

namespace {
// Output projections get the GPT-2 / Megatron scaled init std / sqrt(2 L): each layer adds two
// residual branches, so this keeps the residual stream's variance independent of depth.
float output_std(const ModelConfig& cfg) { return cfg.init_std / std::sqrt(2.0f * static_cast<float>(cfg.n_layers)); }
}  // namespace

AttentionBlock::AttentionBlock(const ModelConfig& cfg, ParamRegistry& reg, Comm& tp, int layer)
    : cfg_(cfg), tp_(tp), heads_(cfg.n_heads / tp.size()), kv_heads_(cfg.n_kv_heads / tp.size()) {
  MOE_CHECK(cfg.n_heads % tp.size() == 0 && cfg.n_kv_heads % tp.size() == 0,
            "model.n_heads ({}) and model.n_kv_heads ({}) must be divisible by parallel.tp ({})", cfg.n_heads,
            cfg.n_kv_heads, tp.size());
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

void AttentionBlock::forward(int64_t B, int64_t T, const Tensor& h_in, const Tensor& h_out,
                             const ops::AttentionMask& mask, AttentionActs& a) const {
  const int64_t C = cfg_.dim, N = B * T, Nl = h_in.dim(0), D = cfg_.head_dim;
  const int64_t H = heads_, Hkv = kv_heads_;
  const Device dev = h_in.device();  // every activation lives where the input does
  const DType act = h_in.dtype();    // and has its dtype (f32, or bf16 in mixed precision)
  a.h_in = h_in;
  const Tensor xn_local = Tensor::empty({Nl, C}, act, dev);
  a.rstd = Tensor::empty({Nl}, DType::kF32, dev);  // statistics stay f32
  ops::rmsnorm_fwd(h_in, norm_->compute, cfg_.norm_eps, xn_local, a.rstd);
  a.xn = gather_rows(tp_, xn_local);

  a.q = Tensor::empty({B, T, H, D}, act, dev);
  a.k = Tensor::empty({B, T, Hkv, D}, act, dev);
  a.v = Tensor::empty({B, T, Hkv, D}, act, dev);
  ops::gemm(a.xn, false, wq_->compute, true, a.q.reshape({N, H * D}));
  ops::gemm(a.xn, false, wk_->compute, true, a.k.reshape({N, Hkv * D}));
  ops::gemm(a.xn, false, wv_->compute, true, a.v.reshape({N, Hkv * D}));
  ops::rope_fwd(a.q, cfg_.rope_theta, a.q);
  ops::rope_fwd(a.k, cfg_.rope_theta, a.k);

  a.out = Tensor::empty({B, T, H, D}, act, dev);
  a.lse = Tensor::empty({B, H, T}, DType::kF32, dev);
  a.mask = mask;
  ops::attention_fwd(a.q, a.k, a.v, 1.0f / std::sqrt(static_cast<float>(D)), a.out, a.lse, mask);

  // Row-parallel output projection: partial sums over this rank's heads, summed by the scatter.
  const Tensor y_partial = tp_.size() == 1 ? h_out : Tensor::empty({N, C}, act, dev);
  ops::gemm(a.out.reshape({N, H * D}), false, wo_->compute, true, y_partial);
  if (tp_.size() > 1) ops::copy(scatter_rows(tp_, y_partial), h_out);
  ops::add_(h_out, h_in);
}

void AttentionBlock::backward(const Tensor& dh_out, const Tensor& dh_in, const AttentionActs& a) const {
  const int64_t B = a.q.dim(0), T = a.q.dim(1), C = cfg_.dim, N = B * T, D = cfg_.head_dim;
  const int64_t H = heads_, Hkv = kv_heads_;
  const Device dev = dh_out.device();
  const DType act = dh_out.dtype();
  const Tensor dy = gather_rows(tp_, dh_out);  // (N, C)

  // y = out · woᵀ
  const Tensor dout = Tensor::empty({B, T, H, D}, act, dev);
  ops::gemm(dy, false, wo_->compute, false, dout.reshape({N, H * D}));
  ops::gemm(dy, true, a.out.reshape({N, H * D}), false, wo_->grad, /*accumulate=*/true);

  const Tensor dq = Tensor::empty({B, T, H, D}, act, dev);
  const Tensor dk = Tensor::empty({B, T, Hkv, D}, act, dev);
  const Tensor dv = Tensor::empty({B, T, Hkv, D}, act, dev);
  ops::attention_bwd(a.q, a.k, a.v, a.out, a.lse, dout, 1.0f / std::sqrt(static_cast<float>(D)), dq, dk, dv,
                     a.mask);
  ops::rope_bwd(dq, cfg_.rope_theta, dq);
  ops::rope_bwd(dk, cfg_.rope_theta, dk);

  // q = xn · wqᵀ (and k, v): dxn = dq·wq + dk·wk + dv·wv, partial over this rank's heads.
  const Tensor dxn = Tensor::empty({N, C}, act, dev);
  ops::gemm(dq.reshape({N, H * D}), false, wq_->compute, false, dxn);
  ops::gemm(dk.reshape({N, Hkv * D}), false, wk_->compute, false, dxn, /*accumulate=*/true);
  ops::gemm(dv.reshape({N, Hkv * D}), false, wv_->compute, false, dxn, /*accumulate=*/true);
  ops::gemm(dq.reshape({N, H * D}), true, a.xn, false, wq_->grad, true);
  ops::gemm(dk.reshape({N, Hkv * D}), true, a.xn, false, wk_->grad, true);
  ops::gemm(dv.reshape({N, Hkv * D}), true, a.xn, false, wv_->grad, true);

  ops::rmsnorm_bwd(a.h_in, norm_->compute, a.rstd, scatter_rows(tp_, dxn), dh_in, norm_->grad);
  ops::add_(dh_in, dh_out);
}

}  // namespace moeforge
