#include "models/transformer.h"

namespace moeforge {

MoeTransformer::MoeTransformer(const ModelConfig& cfg, ShardLayout layout) : cfg_(cfg), registry_(layout) {
  cfg_.validate();
  const int64_t V = cfg_.vocab_size, C = cfg_.dim;
  embed_ = &registry_.add({.name = "embed.weight", .global_shape = {V, C}, .shard_dim = 0,
                           .shard_group = ShardGroup::kTP, .init_std = cfg_.init_std});
  attn_.reserve(static_cast<size_t>(cfg_.n_layers));
  moe_.reserve(static_cast<size_t>(cfg_.n_layers));
  for (int i = 0; i < cfg_.n_layers; ++i) {
    attn_.emplace_back(cfg_, registry_, i);
    moe_.emplace_back(cfg_, registry_, i);
  }
  final_norm_ = &registry_.add(
      {.name = "final_norm.weight", .global_shape = {C}, .init = ParamInit::kOnes, .weight_decay = false});
  if (!cfg_.tie_embeddings) {
    lm_head_ = &registry_.add({.name = "lm_head.weight", .global_shape = {V, C}, .shard_dim = 0,
                               .shard_group = ShardGroup::kTP, .init_std = cfg_.init_std});
  }
}

const Param& MoeTransformer::head() const { return lm_head_ ? *lm_head_ : *embed_; }

void MoeTransformer::layer_forward(int i, const Tensor& h_in, const Tensor& h_out, LayerActs& a) const {
  a.h_in = h_in;
  a.h_mid = Tensor::empty(h_in.shape(), DType::kF32);
  attn_[i].forward(h_in, a.h_mid, a.attn);
  moe_[i].forward(a.h_mid, h_out, a.moe);
}

Tensor MoeTransformer::run_layers(const Tensor& tokens, double& aux, double& z) {
  MOE_CHECK(tokens.ndim() == 2 && tokens.dtype() == DType::kI32,
            "MoeTransformer: tokens must be (B, T) i32, got {}", tokens.str());
  const int64_t B = tokens.dim(0), T = tokens.dim(1), N = B * T, C = cfg_.dim;
  Tensor h = Tensor::empty({B, T, C}, DType::kF32);
  ops::embedding_fwd(tokens.reshape({N}), embed_->value, h.reshape({N, C}));
  aux = 0.0;
  z = 0.0;
  acts_.assign(static_cast<size_t>(cfg_.n_layers), {});
  for (int i = 0; i < cfg_.n_layers; ++i) {
    LayerActs& a = acts_[static_cast<size_t>(i)];
    const Tensor h_next = Tensor::empty({B, T, C}, DType::kF32);
    layer_forward(i, h, h_next, a);
    aux += a.moe.aux;
    z += a.moe.z;
    if (cfg_.recompute) {  // keep only the input; backward re-runs the layer
      a = LayerActs{};
      a.h_in = h;
    }
    h = h_next;
  }
  return h;
}

LossReport MoeTransformer::forward(const Tensor& tokens, const Tensor& targets) {
  MOE_CHECK(targets.shape() == tokens.shape() && targets.dtype() == DType::kI32,
            "MoeTransformer::forward: targets {} must match tokens {}", targets.str(), tokens.str());
  batch_ = tokens.dim(0);
  seq_ = tokens.dim(1);
  const int64_t N = batch_ * seq_, C = cfg_.dim, V = cfg_.vocab_size;
  tokens_ = tokens.reshape({N});
  targets_ = targets.reshape({N});

  LossReport report;
  h_final_ = run_layers(tokens, report.aux, report.z).reshape({N, C});
  f_ = Tensor::empty({N, C}, DType::kF32);
  f_rstd_ = Tensor::empty({N}, DType::kF32);
  ops::rmsnorm_fwd(h_final_, final_norm_->value, cfg_.norm_eps, f_, f_rstd_);
  logits_ = Tensor::empty({N, V}, DType::kF32);
  ops::gemm(f_, false, head().value, true, logits_);
  const Tensor losses = Tensor::empty({N}, DType::kF32);
  lse_ = Tensor::empty({N}, DType::kF32);
  ops::cross_entropy_fwd(logits_, targets_, losses, lse_);

  const std::vector<float> per_row = losses.to_floats();
  const int32_t* tgt = targets_.data<int32_t>();
  double sum = 0.0;
  counted_ = 0;
  for (int64_t n = 0; n < N; ++n) {
    if (tgt[n] < 0) continue;
    sum += per_row[static_cast<size_t>(n)];
    ++counted_;
  }
  report.targets = counted_;
  report.ce = counted_ ? sum / static_cast<double>(counted_) : 0.0;
  report.loss = report.ce + cfg_.aux_loss_coef * report.aux + cfg_.z_loss_coef * report.z;
  return report;
}

Tensor MoeTransformer::logits(const Tensor& tokens) {
  const int64_t B = tokens.dim(0), T = tokens.dim(1), N = B * T, C = cfg_.dim, V = cfg_.vocab_size;
  double aux = 0.0, z = 0.0;
  const Tensor h = run_layers(tokens, aux, z).reshape({N, C});
  acts_.clear();
  const Tensor f = Tensor::empty({N, C}, DType::kF32);
  const Tensor rstd = Tensor::empty({N}, DType::kF32);
  ops::rmsnorm_fwd(h, final_norm_->value, cfg_.norm_eps, f, rstd);
  const Tensor out = Tensor::empty({B, T, V}, DType::kF32);
  ops::gemm(f, false, head().value, true, out.reshape({N, V}));
  return out;
}

void MoeTransformer::backward(float loss_scale) {
  MOE_CHECK(logits_.defined(), "MoeTransformer::backward: call forward() first");
  const int64_t N = batch_ * seq_, C = cfg_.dim;

  // Head: logits = f · Wᵀ. The CE gradient overwrites the logits buffer in place.
  const float scale = counted_ ? loss_scale / static_cast<float>(counted_) : 0.0f;
  ops::cross_entropy_bwd(logits_, targets_, lse_, scale, logits_);
  const Param& w = head();
  ops::gemm(logits_, true, f_, false, w.grad, /*accumulate=*/true);
  const Tensor df = Tensor::empty({N, C}, DType::kF32);
  ops::gemm(logits_, false, w.value, false, df);
  logits_ = Tensor();

  Tensor dh = Tensor::empty({batch_, seq_, C}, DType::kF32);
  ops::rmsnorm_bwd(h_final_, final_norm_->value, f_rstd_, df, dh.reshape({N, C}), final_norm_->grad);

  Tensor dh_prev = Tensor::empty({batch_, seq_, C}, DType::kF32);
  const Tensor dh_mid = Tensor::empty({batch_, seq_, C}, DType::kF32);
  for (int i = cfg_.n_layers - 1; i >= 0; --i) {
    LayerActs& a = acts_[static_cast<size_t>(i)];
    if (cfg_.recompute) {
      const Tensor scratch = Tensor::empty(a.h_in.shape(), DType::kF32);
      layer_forward(i, a.h_in, scratch, a);
    }
    moe_[static_cast<size_t>(i)].backward(dh, dh_mid, a.moe, loss_scale);
    attn_[static_cast<size_t>(i)].backward(dh_mid, dh_prev, a.attn);
    a = LayerActs{};
    std::swap(dh, dh_prev);
  }
  ops::embedding_bwd(tokens_, dh.reshape({N, C}), embed_->grad);
  acts_.clear();
}

std::vector<Tensor> MoeTransformer::last_routing() const {
  std::vector<Tensor> out;
  for (const LayerActs& a : acts_) out.push_back(a.moe.experts);
  return out;
}

}  // namespace moeforge
