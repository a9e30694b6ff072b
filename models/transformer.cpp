#include "models/transformer.h"

#include <algorithm>

#include "parallel/sequence_parallel.h"

namespace moeforge {

namespace {
ShardLayout shard_layout(const ProcessGrid& g) { return {g.tp().size(), g.tp().rank(), g.ep().size(), g.ep().rank()}; }
}  // namespace

MoeTransformer::MoeTransformer(const ModelConfig& cfg, const ProcessGrid& grid)
    : cfg_(cfg),
      grid_(grid),
      padded_vocab_((cfg.vocab_size + grid.tp().size() - 1) / grid.tp().size() * grid.tp().size()),
      registry_(shard_layout(grid)) {
  cfg_.validate();
  const int64_t C = cfg_.dim, pad = padded_vocab_ - cfg_.vocab_size;
  embed_ = &registry_.add({.name = "embed.weight", .global_shape = {padded_vocab_, C}, .shard_dim = 0,
                           .shard_group = ShardGroup::kTP, .init_std = cfg_.init_std, .padded_rows = pad});
  attn_.reserve(static_cast<size_t>(cfg_.n_layers));
  moe_.reserve(static_cast<size_t>(cfg_.n_layers));
  for (int i = 0; i < cfg_.n_layers; ++i) {
    attn_.emplace_back(cfg_, registry_, grid_.tp(), i);
    moe_.emplace_back(cfg_, registry_, grid_, i);
  }
  final_norm_ = &registry_.add(
      {.name = "final_norm.weight", .global_shape = {C}, .init = ParamInit::kOnes, .weight_decay = false});
  if (!cfg_.tie_embeddings) {
    lm_head_ = &registry_.add({.name = "lm_head.weight", .global_shape = {padded_vocab_, C}, .shard_dim = 0,
                               .shard_group = ShardGroup::kTP, .init_std = cfg_.init_std, .padded_rows = pad});
  }
}

const Param& MoeTransformer::head() const { return lm_head_ ? *lm_head_ : *embed_; }

int64_t MoeTransformer::vocab_start() const { return embed_->value.dim(0) * grid_.tp().rank(); }

int64_t MoeTransformer::vocab_valid() const {
  return std::clamp<int64_t>(cfg_.vocab_size - vocab_start(), 0, embed_->value.dim(0));
}

void MoeTransformer::layer_forward(int i, const Tensor& h_in, const Tensor& h_out, LayerActs& a) const {
  a.h_in = h_in;
  a.h_mid = Tensor::empty(h_in.shape(), DType::kF32);
  attn_[static_cast<size_t>(i)].forward(batch_, seq_, h_in, a.h_mid, a.attn);
  moe_[static_cast<size_t>(i)].forward(a.h_mid, h_out, a.moe);
}

Tensor MoeTransformer::run_trunk(const Tensor& tokens, double& aux, double& z) {
  MOE_CHECK(tokens.ndim() == 2 && tokens.dtype() == DType::kI32,
            "MoeTransformer: tokens must be (B, T) i32, got {}", tokens.str());
  Comm& tp = grid_.tp();
  batch_ = tokens.dim(0);
  seq_ = tokens.dim(1);
  const int64_t N = batch_ * seq_, C = cfg_.dim;
  MOE_CHECK(N % tp.size() == 0, "MoeTransformer: a micro-batch of {} tokens does not split over {} TP ranks", N,
            tp.size());
  tokens_ = tokens.reshape({N});

  // Vocab-parallel embedding: each rank fills the rows of its vocabulary shard, the scatter sums
  // the shards and leaves each rank its token rows.
  const Tensor emb = Tensor::empty({N, C}, DType::kF32);
  ops::embedding_fwd(tokens_, embed_->value, emb, vocab_start(), cfg_.vocab_size);
  Tensor h = scatter_rows(tp, emb);
  const int64_t Nl = h.dim(0);

  aux = 0.0;
  z = 0.0;
  acts_.assign(static_cast<size_t>(cfg_.n_layers), {});
  const int64_t E = cfg_.n_experts;
  last_load_ = Tensor::empty({cfg_.n_layers, E + 1}, DType::kI64);
  for (int i = 0; i < cfg_.n_layers; ++i) {
    LayerActs& a = acts_[static_cast<size_t>(i)];
    const Tensor h_next = Tensor::empty({Nl, C}, DType::kF32);
    layer_forward(i, h, h_next, a);
    aux += a.moe.aux;
    z += a.moe.z;
    int64_t* load = last_load_.data<int64_t>() + i * (E + 1);
    std::copy_n(a.moe.counts.data<int64_t>(), E, load);
    load[E] = a.moe.dropped;
    if (cfg_.recompute) {  // keep only the input; backward re-runs the layer
      a = LayerActs{};
      a.h_in = h;
    }
    h = h_next;
  }

  h_final_ = h;
  const Tensor f_local = Tensor::empty({Nl, C}, DType::kF32);
  f_rstd_ = Tensor::empty({Nl}, DType::kF32);
  ops::rmsnorm_fwd(h_final_, final_norm_->value, cfg_.norm_eps, f_local, f_rstd_);
  return gather_rows(tp, f_local);
}

Tensor MoeTransformer::head_logits(const Tensor& f) const {
  const Tensor logits = Tensor::empty({f.dim(0), head().value.dim(0)}, DType::kF32);
  ops::gemm(f, false, head().value, true, logits);
  return logits;
}

LossReport MoeTransformer::forward(const Tensor& tokens, const Tensor& targets) {
  MOE_CHECK(targets.shape() == tokens.shape() && targets.dtype() == DType::kI32,
            "MoeTransformer::forward: targets {} must match tokens {}", targets.str(), tokens.str());
  Comm& tp = grid_.tp();
  LossReport report;
  f_ = run_trunk(tokens, report.aux, report.z);
  const int64_t N = batch_ * seq_;
  targets_ = targets.reshape({N});

  // Vocab-parallel cross-entropy: per-row statistics of each shard, combined on every rank.
  logits_ = head_logits(f_);
  const Tensor partial = Tensor::empty({N, 3}, DType::kF32);
  ops::cross_entropy_partial_fwd(logits_, targets_, vocab_start(), vocab_valid(), partial);
  const Tensor partials = gather_rows(tp, partial).reshape({tp.size(), N, 3});
  const Tensor losses = Tensor::empty({N}, DType::kF32);
  lse_ = Tensor::empty({N}, DType::kF32);
  ops::cross_entropy_combine(partials, targets_, cfg_.vocab_size, losses, lse_);

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
  if (tp.size() > 1) {  // the router losses were summed over this rank's rows only
    const Tensor parts = Tensor::from_floats({2}, std::vector<float>{static_cast<float>(report.aux),
                                                                     static_cast<float>(report.z)});
    tp.all_reduce(parts);
    report.aux = parts.data<float>()[0];
    report.z = parts.data<float>()[1];
  }
  report.loss = report.ce + cfg_.aux_loss_coef * report.aux + cfg_.z_loss_coef * report.z;
  return report;
}

Tensor MoeTransformer::logits(const Tensor& tokens) {
  Comm& tp = grid_.tp();
  MOE_CHECK(tokens.ndim() == 2 && tokens.dtype() == DType::kI32,
            "MoeTransformer::logits: tokens must be (B, T) i32, got {}", tokens.str());
  const int64_t B = tokens.dim(0), T = tokens.dim(1);
  // Sequence parallelism needs B*T divisible by tp: append positions (token 0) at the end of each
  // sequence. Attention is causal, so they change nothing before them; their logits are dropped.
  int64_t Tp = T;
  while ((B * Tp) % tp.size() != 0) ++Tp;
  Tensor input = tokens;
  if (Tp != T) {
    input = Tensor::zeros({B, Tp}, DType::kI32);
    for (int64_t b = 0; b < B; ++b)
      std::copy_n(tokens.data<int32_t>() + b * T, T, input.data<int32_t>() + b * Tp);
  }
  double aux = 0.0, z = 0.0;
  const Tensor f = run_trunk(input, aux, z);
  acts_.clear();
  const Tensor local = head_logits(f);  // (N, Vl)
  const int64_t N = f.dim(0), Vl = local.dim(1), V = cfg_.vocab_size;
  const Tensor shards = gather_rows(tp, local).reshape({tp.size(), N, Vl});  // one block per vocab shard
  const Tensor out = Tensor::empty({B, T, V}, DType::kF32);
  const float* src = shards.data<float>();
  float* dst = out.data<float>();
  for (int r = 0; r < tp.size(); ++r) {
    const int64_t cols = std::clamp<int64_t>(V - r * Vl, 0, Vl);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < T; ++t)
        std::copy_n(src + (r * N + b * Tp + t) * Vl, cols, dst + (b * T + t) * V + r * Vl);
  }
  return out;
}

void MoeTransformer::backward(float loss_scale) {
  MOE_CHECK(logits_.defined(), "MoeTransformer::backward: call forward() first");
  Comm& tp = grid_.tp();
  const int64_t C = cfg_.dim, Nl = h_final_.dim(0);

  // Head: logits = f · Wᵀ over this rank's vocabulary rows. The CE gradient overwrites the logits
  // buffer in place; df is partial over vocabulary shards, summed by the scatter to local rows.
  const float scale = counted_ ? loss_scale / static_cast<float>(counted_) : 0.0f;
  ops::cross_entropy_bwd(logits_, targets_, lse_, scale, logits_, vocab_start(), vocab_valid());
  const Param& w = head();
  ops::gemm(logits_, true, f_, false, w.grad, /*accumulate=*/true);
  const Tensor df = Tensor::empty({f_.dim(0), C}, DType::kF32);
  ops::gemm(logits_, false, w.value, false, df);
  logits_ = Tensor();

  Tensor dh = Tensor::empty({Nl, C}, DType::kF32);
  ops::rmsnorm_bwd(h_final_, final_norm_->value, f_rstd_, scatter_rows(tp, df), dh, final_norm_->grad);

  Tensor dh_prev = Tensor::empty({Nl, C}, DType::kF32);
  const Tensor dh_mid = Tensor::empty({Nl, C}, DType::kF32);
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
  ops::embedding_bwd(tokens_, gather_rows(tp, dh), embed_->grad, vocab_start(), cfg_.vocab_size);
  acts_.clear();
}

void MoeTransformer::update_expert_bias(const Tensor& load) {
  const int64_t E = cfg_.n_experts;
  MOE_CHECK(load.dtype() == DType::kI64 && load.shape() == Shape({cfg_.n_layers, E + 1}),
            "MoeTransformer::update_expert_bias: load must be ({}, {}) i64, got {}", cfg_.n_layers, E + 1, load.str());
  for (int i = 0; i < cfg_.n_layers; ++i) moe_[static_cast<size_t>(i)].update_bias(load.data<int64_t>() + i * (E + 1));
}

std::vector<Tensor> MoeTransformer::last_routing() const {
  std::vector<Tensor> out;
  for (const LayerActs& a : acts_) out.push_back(a.moe.experts);
  return out;
}

}  // namespace moeforge
