#include "models/transformer.h"

#include <algorithm>

#include "models/device_tensors.h"
#include "parallel/sequence_parallel.h"

namespace moeforge {

namespace {
ShardLayout shard_layout(const ProcessGrid& g) { return {g.tp().size(), g.tp().rank(), g.ep().size(), g.ep().rank()}; }

// The split to use: the given one, or (an empty split) one chunk per pipeline rank, balanced.
PipelineSplit resolve_split(const PipelineSplit& s, const ModelConfig& cfg, const ProcessGrid& g) {
  if (!s.first_layer.empty()) {
    MOE_CHECK(s.pp == g.pp().size() && s.first_layer.size() == static_cast<size_t>(s.chunks()) + 1 &&
                  s.first_layer.back() == cfg.n_layers,
              "MoeTransformer: the pipeline split ({} chunks over pp {}) does not fit the grid (pp {}) and {} layers",
              s.chunks(), s.pp, g.pp().size(), cfg.n_layers);
    return s;
  }
  return split_layers(cfg.n_layers, g.pp().size(), 1, "");
}

int64_t bytes_of(const Tensor& t) { return t.defined() ? t.nbytes() : 0; }

// A copy of the (B, T) i32 ids as (B*T) on the model's device (from the host: the one copy of a
// micro-batch's ids to a GPU): the caller's buffer is refilled for the next micro-batch while
// this one's backward is still pending.
Tensor flat_copy(const Tensor& ids, Device device) { return ids.reshape({ids.numel()}).to_device(device); }
}  // namespace

MoeTransformer::MoeTransformer(const ModelConfig& cfg, const ProcessGrid& grid, const PipelineSplit& split)
    : cfg_(cfg),
      grid_(grid),
      split_(resolve_split(split, cfg, grid)),
      stage_(grid.pp().rank()),
      padded_vocab_((cfg.vocab_size + grid.tp().size() - 1) / grid.tp().size() * grid.tp().size()),
      registry_(shard_layout(grid), grid.device()) {
  cfg_.validate();
  const int64_t C = cfg_.dim, pad = padded_vocab_ - cfg_.vocab_size;
  const bool has_first = first_chunk(0);
  bool has_last = false;
  for (int c = 0; c < chunks(); ++c) has_last = has_last || last_chunk(c);
  const bool pipelined = grid_.pp().size() > 1;

  // Registration follows model order, so the flat (ZeRO-1) layout is deterministic per rank.
  if (has_first || (has_last && cfg_.tie_embeddings)) {
    const bool replica = !has_first;  // the last stage's copy of tied embeddings
    embed_ = &registry_.add({.name = "embed.weight", .global_shape = {padded_vocab_, C}, .shard_dim = 0,
                             .shard_group = ShardGroup::kTP, .init_std = cfg_.init_std, .padded_rows = pad,
                             .tied = cfg_.tie_embeddings && pipelined, .replica = replica});
  }
  layer_slot_.assign(static_cast<size_t>(cfg_.n_layers), -1);
  int count = 0;
  for (int c = 0; c < chunks(); ++c) count += chunk_range(c).second - chunk_range(c).first;
  layers_.reserve(static_cast<size_t>(count));
  for (int c = 0; c < chunks(); ++c) {
    const auto [first, end] = chunk_range(c);
    for (int i = first; i < end; ++i) {
      layer_slot_[static_cast<size_t>(i)] = static_cast<int>(layers_.size());
      Layer& l = layers_.emplace_back(Layer{i, AttentionBlock(cfg_, registry_, grid_.tp(), i), std::nullopt, std::nullopt});
      if (is_moe_layer(i)) {
        l.moe.emplace(cfg_, registry_, grid_, i);
      } else {
        l.dense.emplace(cfg_, registry_, i);
      }
    }
  }
  if (has_last) {
    final_norm_ = &registry_.add(
        {.name = "final_norm.weight", .global_shape = {C}, .init = ParamInit::kOnes, .weight_decay = false});
    if (!cfg_.tie_embeddings) {
      lm_head_ = &registry_.add({.name = "lm_head.weight", .global_shape = {padded_vocab_, C}, .shard_dim = 0,
                                 .shard_group = ShardGroup::kTP, .init_std = cfg_.init_std, .padded_rows = pad});
    }
  }
  registry_.set_compute_dtype(cfg_.compute_dtype);
  reset_load();
}

std::pair<int, int> MoeTransformer::chunk_range(int c) const {
  const int g = split_.model_chunk(stage_, c);
  return {split_.first_layer[static_cast<size_t>(g)], split_.first_layer[static_cast<size_t>(g) + 1]};
}

const Param& MoeTransformer::head() const { return lm_head_ ? *lm_head_ : *embed_; }

int64_t MoeTransformer::vocab_start() const { return head().value.dim(0) * grid_.tp().rank(); }

int64_t MoeTransformer::vocab_valid() const {
  return std::clamp<int64_t>(cfg_.vocab_size - vocab_start(), 0, head().value.dim(0));
}

void MoeTransformer::reset_load() { load_ = Tensor::zeros({cfg_.n_layers, cfg_.n_experts + 1}, DType::kI64); }

ops::AttentionMask MoeTransformer::attention_mask(const Tensor& tokens) const {
  ops::AttentionMask mask;
  mask.window = cfg_.sliding_window;
  if (cfg_.document_start_token < 0) return mask;
  const Tensor ids = host(tokens);
  const int64_t B = ids.dim(0), T = ids.dim(1);
  const int32_t* p = ids.data<int32_t>();
  std::vector<int32_t> cu{0};
  for (int64_t r = 1; r < B * T; ++r)
    if (r % T == 0 || p[r] == cfg_.document_start_token) cu.push_back(static_cast<int32_t>(r));
  cu.push_back(static_cast<int32_t>(B * T));
  for (size_t s = 0; s + 1 < cu.size(); ++s) mask.max_seqlen = std::max<int64_t>(mask.max_seqlen, cu[s + 1] - cu[s]);
  mask.cu_seqlens = on_device(Tensor::from_ints({std::ssize(cu)}, cu), device());
  return mask;
}

void MoeTransformer::layer_forward(int i, int64_t B, int64_t T, const ops::AttentionMask& mask, const Tensor& h_in,
                                   const Tensor& h_out, LayerActs& a) const {
  const Layer& l = layer(i);
  const Device dev = h_in.device();
  a.h_in = h_in;
  a.h_mid = Tensor::empty(h_in.shape(), h_in.dtype(), dev);
  l.attn.forward(B, T, h_in, a.h_mid, mask, a.attn);
  if (l.moe) {
    l.moe->forward(a.h_mid, h_out, a.moe);
  } else {
    l.dense->forward(a.h_mid, h_out, a.dense);
  }
}

Tensor MoeTransformer::run_layers(int c, const Tensor& tokens, const Tensor& h_in, ChunkActs& a, ChunkLoss& loss,
                                  bool keep) {
  MOE_CHECK(tokens.ndim() == 2 && tokens.dtype() == DType::kI32,
            "MoeTransformer: tokens must be (B, T) i32, got {}", tokens.str());
  Comm& tp = grid_.tp();
  a.batch = tokens.dim(0);
  a.seq = tokens.dim(1);
  a.mask = attention_mask(tokens);
  const int64_t N = a.batch * a.seq, C = cfg_.dim;
  MOE_CHECK(N % tp.size() == 0, "MoeTransformer: a micro-batch of {} tokens does not split over {} TP ranks", N,
            tp.size());
  const int64_t Nl = N / tp.size();
  const Device dev = device();
  Tensor h;
  if (first_chunk(c)) {
    // Vocab-parallel embedding: each rank fills the rows of its vocabulary shard, the scatter sums
    // the shards and leaves each rank its token rows.
    a.tokens = flat_copy(tokens, dev);
    const Tensor emb = Tensor::empty({N, C}, compute_dtype(), dev);  // the activations' dtype starts here
    ops::embedding_fwd(a.tokens, embed_->compute, emb, vocab_start(), cfg_.vocab_size);
    h = scatter_rows(tp, emb);
  } else {
    MOE_CHECK(h_in.defined() && h_in.shape() == Shape({Nl, C}),
              "MoeTransformer: chunk {} expects its input of shape ({}, {}), got {}", c, Nl, C,
              h_in.defined() ? h_in.str() : std::string("nothing"));
    h = h_in;
  }
  const auto [first, end] = chunk_range(c);
  const int64_t E = cfg_.n_experts;
  a.layers.assign(static_cast<size_t>(end - first), {});
  for (int i = first; i < end; ++i) {
    LayerActs& la = a.layers[static_cast<size_t>(i - first)];
    const Tensor h_next = Tensor::empty({Nl, C}, h.dtype(), dev);
    layer_forward(i, a.batch, a.seq, a.mask, h, h_next, la);
    if (layer(i).moe) {
      loss.aux += la.moe.aux;
      loss.z += la.moe.z;
      if (keep) {
        int64_t* row = load_.data<int64_t>() + i * (E + 1);
        for (int64_t e = 0; e < E; ++e) row[e] += la.moe.counts_host.data<int64_t>()[e];
        row[E] += la.moe.dropped;
      }
    }
    if (!keep || cfg_.recompute) {  // keep only the input; backward re-runs the layer
      la = LayerActs{};
      la.h_in = h;
    }
    h = h_next;
  }
  return h;
}

Tensor MoeTransformer::final_norm(const Tensor& h, ChunkActs& a) const {
  a.h_final = h;
  const Device dev = h.device();
  const Tensor f_local = Tensor::empty(h.shape(), h.dtype(), dev);
  a.f_rstd = Tensor::empty({h.dim(0)}, DType::kF32, dev);
  ops::rmsnorm_fwd(h, final_norm_->compute, cfg_.norm_eps, f_local, a.f_rstd);
  return gather_rows(grid_.tp(), f_local);
}

Tensor MoeTransformer::head_logits(const Tensor& f) const {
  const Device dev = f.device();
  // bf16 logits in mixed precision: the CE reads them and keeps its statistics in f32.
  const Tensor logits = Tensor::empty({f.dim(0), head().value.dim(0)}, f.dtype(), dev);
  ops::gemm(f, false, head().compute, true, logits);
  return logits;
}

Tensor MoeTransformer::forward_chunk(int c, int mb, const Tensor& tokens, const Tensor& targets, const Tensor& h_in,
                                     ChunkLoss& loss, bool keep) {
  MOE_CHECK(c >= 0 && c < chunks(), "MoeTransformer::forward_chunk: chunk {} is outside [0, {})", c, chunks());
  MOE_CHECK(!keep || !acts_.count({c, mb}), "MoeTransformer::forward_chunk: chunk {} micro-batch {} is already in flight",
            c, mb);
  ChunkActs a;
  const Tensor h = run_layers(c, tokens, h_in, a, loss, keep);
  if (!last_chunk(c)) {
    if (keep) acts_.emplace(std::pair{c, mb}, std::move(a));
    return h;
  }
  MOE_CHECK(targets.shape() == tokens.shape() && targets.dtype() == DType::kI32,
            "MoeTransformer: targets {} must match tokens {}", targets.str(), tokens.str());
  Comm& tp = grid_.tp();
  const Device dev = device();
  const int64_t N = a.batch * a.seq;
  a.targets = flat_copy(targets, dev);
  a.f = final_norm(h, a);

  // Vocab-parallel cross-entropy: per-row statistics of each shard, combined on every rank.
  a.logits = head_logits(a.f);
  const Tensor partial = Tensor::empty({N, 3}, DType::kF32, dev);
  ops::cross_entropy_partial_fwd(a.logits, a.targets, vocab_start(), vocab_valid(), partial);
  const Tensor partials = gather_rows(tp, partial).reshape({tp.size(), N, 3});
  const Tensor losses = Tensor::empty({N}, DType::kF32, dev);
  a.lse = Tensor::empty({N}, DType::kF32, dev);
  ops::cross_entropy_combine(partials, a.targets, cfg_.vocab_size, losses, a.lse);

  // The mean over counted rows is formed on the host, in double (a copy of N losses from a GPU).
  const std::vector<float> per_row = host(losses).to_floats();
  const Tensor targets_host = host(targets);
  const int32_t* tgt = targets_host.data<int32_t>();
  double sum = 0.0;
  a.counted = 0;
  for (int64_t n = 0; n < N; ++n) {
    if (tgt[n] < 0) continue;
    sum += per_row[static_cast<size_t>(n)];
    ++a.counted;
  }
  loss.targets += a.counted;
  loss.ce += a.counted ? sum / static_cast<double>(a.counted) : 0.0;
  if (keep) acts_.emplace(std::pair{c, mb}, std::move(a));
  return Tensor();
}

Tensor MoeTransformer::backward_chunk(int c, int mb, const Tensor& dh_out, float loss_scale) {
  const auto it = acts_.find({c, mb});
  MOE_CHECK(it != acts_.end(), "MoeTransformer::backward_chunk: chunk {} micro-batch {} has no forward in flight", c,
            mb);
  ChunkActs& a = it->second;
  Comm& tp = grid_.tp();
  const Device dev = device();
  const int64_t C = cfg_.dim, N = a.batch * a.seq, Nl = N / tp.size();

  Tensor dh = Tensor::empty({Nl, C}, compute_dtype(), dev);
  if (last_chunk(c)) {
    // Head: logits = f · Wᵀ over this rank's vocabulary rows. The CE gradient overwrites the
    // logits buffer in place; df is partial over vocabulary shards, summed by the scatter.
    const float scale = a.counted ? loss_scale / static_cast<float>(a.counted) : 0.0f;
    ops::cross_entropy_bwd(a.logits, a.targets, a.lse, scale, a.logits, vocab_start(), vocab_valid());
    const Param& w = head();
    ops::gemm(a.logits, true, a.f, false, w.grad, /*accumulate=*/true);
    const Tensor df = Tensor::empty({N, C}, a.f.dtype(), dev);
    ops::gemm(a.logits, false, w.compute, false, df);
    a.logits = Tensor();
    ops::rmsnorm_bwd(a.h_final, final_norm_->compute, a.f_rstd, scatter_rows(tp, df), dh, final_norm_->grad);
  } else {
    MOE_CHECK(dh_out.defined() && dh_out.shape() == Shape({Nl, C}),
              "MoeTransformer: chunk {} expects its output gradient of shape ({}, {}), got {}", c, Nl, C,
              dh_out.defined() ? dh_out.str() : std::string("nothing"));
    ops::copy(dh_out, dh);
  }

  const auto [first, end] = chunk_range(c);
  Tensor dh_prev = Tensor::empty({Nl, C}, dh.dtype(), dev);
  const Tensor dh_mid = Tensor::empty({Nl, C}, dh.dtype(), dev);
  for (int i = end - 1; i >= first; --i) {
    LayerActs& la = a.layers[static_cast<size_t>(i - first)];
    if (cfg_.recompute) {
      const Tensor scratch = Tensor::empty(la.h_in.shape(), la.h_in.dtype(), dev);
      layer_forward(i, a.batch, a.seq, a.mask, la.h_in, scratch, la);
    }
    const Layer& l = layer(i);
    if (l.moe) {
      l.moe->backward(dh, dh_mid, la.moe, loss_scale);
    } else {
      l.dense->backward(dh, dh_mid, la.dense);
    }
    l.attn.backward(dh_mid, dh_prev, la.attn);
    la = LayerActs{};
    std::swap(dh, dh_prev);
  }
  Tensor out;
  if (first_chunk(c)) {
    ops::embedding_bwd(a.tokens, gather_rows(tp, dh), embed_->grad, vocab_start(), cfg_.vocab_size);
  } else {
    out = dh;
  }
  acts_.erase(it);
  return out;
}

// Sequence parallelism needs B*T divisible by tp: logits_chunk appends positions (token 0) at the
// end of each sequence. Attention is causal, so they change nothing before them; their logits are
// dropped.
int64_t MoeTransformer::padded_length(int64_t B, int64_t T) const {
  int64_t Tp = T;
  while ((B * Tp) % grid_.tp().size() != 0) ++Tp;
  return Tp;
}

int64_t MoeTransformer::activation_bytes() const {
  int64_t total = 0;
  for (const auto& [key, a] : acts_) {
    total += bytes_of(a.tokens) + bytes_of(a.targets) + bytes_of(a.h_final) + bytes_of(a.f_rstd) + bytes_of(a.f) +
             bytes_of(a.logits) + bytes_of(a.lse);
    for (const LayerActs& l : a.layers) {
      total += bytes_of(l.h_in) + bytes_of(l.h_mid);
      const AttentionActs& t = l.attn;
      for (const Tensor* x : {&t.rstd, &t.xn, &t.q, &t.k, &t.v, &t.out, &t.lse}) total += bytes_of(*x);
      const MoeActs& m = l.moe;
      for (const Tensor* x : {&m.xn, &m.rstd, &m.logits, &m.weights, &m.experts, &m.lse, &m.positions, &m.counts,
                              &m.xl, &m.gate, &m.up, &m.act, &m.y, &m.s_gate, &m.s_up, &m.s_act})
        total += bytes_of(*x);
      const DenseActs& d = l.dense;
      for (const Tensor* x : {&d.xn, &d.rstd, &d.gate, &d.up, &d.act}) total += bytes_of(*x);
    }
  }
  return total;
}

LossReport MoeTransformer::forward(const Tensor& tokens, const Tensor& targets) {
  MOE_CHECK(split_.chunks() == 1, "MoeTransformer::forward runs the whole model; with {} pipeline chunks use "
            "forward_chunk", split_.chunks());
  MOE_CHECK(targets.shape() == tokens.shape() && targets.dtype() == DType::kI32,
            "MoeTransformer::forward: targets {} must match tokens {}", targets.str(), tokens.str());
  acts_.clear();
  ChunkLoss part;
  forward_chunk(0, 0, tokens, targets, Tensor(), part);
  LossReport report{.ce = part.ce, .aux = part.aux, .z = part.z, .targets = part.targets};
  Comm& tp = grid_.tp();
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

void MoeTransformer::backward(float loss_scale) {
  MOE_CHECK(acts_.count({0, 0}), "MoeTransformer::backward: call forward() first");
  backward_chunk(0, 0, Tensor(), loss_scale);
}

Tensor MoeTransformer::logits(const Tensor& tokens) {
  MOE_CHECK(split_.chunks() == 1, "MoeTransformer::logits runs the whole model; with {} pipeline chunks use "
            "logits_chunk", split_.chunks());
  return logits_chunk(0, tokens, Tensor());
}

Tensor MoeTransformer::logits_chunk(int c, const Tensor& tokens, const Tensor& h_in) {
  Comm& tp = grid_.tp();
  MOE_CHECK(tokens.ndim() == 2 && tokens.dtype() == DType::kI32,
            "MoeTransformer::logits: tokens must be (B, T) i32, got {}", tokens.str());
  const int64_t B = tokens.dim(0), T = tokens.dim(1), Tp = padded_length(B, T);
  Tensor input = tokens;
  if (Tp != T) {  // padded on the host
    const Tensor ids = host(tokens);
    input = Tensor::zeros({B, Tp}, DType::kI32);
    for (int64_t b = 0; b < B; ++b) std::copy_n(ids.data<int32_t>() + b * T, T, input.data<int32_t>() + b * Tp);
  }
  ChunkActs a;
  ChunkLoss unused;
  const Tensor h = run_layers(c, input, h_in, a, unused, /*keep=*/false);
  if (!last_chunk(c)) return h;
  const Tensor f = final_norm(h, a);
  const Tensor local = head_logits(f);  // (N, Vl)
  const int64_t N = f.dim(0), Vl = local.dim(1), V = cfg_.vocab_size;
  // One block per vocab shard, rearranged on the host: the logits are returned in host memory.
  Tensor shards = host(gather_rows(tp, local)).reshape({tp.size(), N, Vl});
  if (shards.dtype() != DType::kF32) shards = shards.to(DType::kF32);  // bf16 logits, returned as f32
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

void MoeTransformer::update_expert_bias(const Tensor& load) {
  const int64_t E = cfg_.n_experts;
  MOE_CHECK(load.dtype() == DType::kI64 && load.shape() == Shape({cfg_.n_layers, E + 1}),
            "MoeTransformer::update_expert_bias: load must be ({}, {}) i64, got {}", cfg_.n_layers, E + 1, load.str());
  for (Layer& l : layers_)
    if (l.moe) l.moe->update_bias(load.data<int64_t>() + l.index * (E + 1));
}

std::vector<Tensor> MoeTransformer::last_routing() const {
  std::vector<Tensor> out;
  const auto it = acts_.find({0, 0});
  if (it == acts_.end()) return out;
  for (const LayerActs& a : it->second.layers)
    if (a.moe.experts.defined()) out.push_back(a.moe.experts);
  return out;
}

}  // namespace moeforge
