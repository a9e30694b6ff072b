#include "models/inference.h"

#include <algorithm>
#include <cmath>

#include <fmt/format.h>

#include "runtime/ops.h"

namespace moeforge {

namespace {

const Tensor* param(const ParamRegistry& reg, const std::string& name, const Shape& shape) {
  const Param& p = reg.get(name);
  MOE_CHECK(p.value.shape() == shape,
            "InferenceModel: parameter {} is {}, expected the whole tensor {} (a single-rank registry)", name,
            p.value.shape().str(), shape.str());
  return &p.value;
}

// x (n, heads, D) at positions [pos, pos + n): the catalog's rope_fwd rotation with the position
// offset (angles in double, cos/sin rounded to f32 as rope_fwd does).
void rope_at(const Tensor& x, int64_t pos, const std::vector<double>& inv_freq) {
  const int64_t n = x.dim(0), heads = x.dim(1), half = x.dim(2) / 2;
  float* p = x.data<float>();
  std::vector<float> c(static_cast<size_t>(half)), s(static_cast<size_t>(half));
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t i = 0; i < half; ++i) {
      const double angle = static_cast<double>(pos + t) * inv_freq[static_cast<size_t>(i)];
      c[static_cast<size_t>(i)] = static_cast<float>(std::cos(angle));
      s[static_cast<size_t>(i)] = static_cast<float>(std::sin(angle));
    }
    for (int64_t h = 0; h < heads; ++h) {
      float* v = p + (t * heads + h) * half * 2;
      for (int64_t i = 0; i < half; ++i) {
        const float x1 = v[i], x2 = v[i + half];
        v[i] = x1 * c[static_cast<size_t>(i)] - x2 * s[static_cast<size_t>(i)];
        v[i + half] = x2 * c[static_cast<size_t>(i)] + x1 * s[static_cast<size_t>(i)];
      }
    }
  }
}

}  // namespace

InferenceModel::InferenceModel(const ModelConfig& cfg, const ParamRegistry& reg, int64_t max_positions)
    : cfg_(cfg), max_pos_(max_positions) {
  cfg_.validate();
  MOE_CHECK(max_positions > 0, "InferenceModel: max_positions must be positive, got {}", max_positions);
  MOE_CHECK(reg.device().is_cpu(), "InferenceModel: the registry is on {}; KV-cache inference runs on the CPU "
            "(load the checkpoint into a CPU registry)", reg.device().str());
  const int64_t C = cfg.dim, V = cfg.vocab_size, D = cfg.head_dim, E = cfg.n_experts, F = cfg.expert_hidden;
  const int64_t HD = cfg.n_heads * D, KD = cfg.n_kv_heads * D;
  embed_ = param(reg, "embed.weight", {V, C});
  final_norm_ = param(reg, "final_norm.weight", {C});
  head_ = cfg.tie_embeddings ? embed_ : param(reg, "lm_head.weight", {V, C});
  for (int i = 0; i < cfg.n_layers; ++i) {
    const std::string p = fmt::format("layers.{}.", i);
    Layer l{};
    l.attn_norm = param(reg, p + "attn_norm.weight", {C});
    l.wq = param(reg, p + "attn.wq", {HD, C});
    l.wk = param(reg, p + "attn.wk", {KD, C});
    l.wv = param(reg, p + "attn.wv", {KD, C});
    l.wo = param(reg, p + "attn.wo", {C, HD});
    if (i < cfg.n_dense_layers) {
      const int64_t Fd = cfg.dense_hidden;
      l.ffn_norm = param(reg, p + "ffn_norm.weight", {C});
      l.w1 = param(reg, p + "ffn.w1", {Fd, C});
      l.w3 = param(reg, p + "ffn.w3", {Fd, C});
      l.w2 = param(reg, p + "ffn.w2", {C, Fd});
    } else {
      l.ffn_norm = param(reg, p + "moe_norm.weight", {C});
      l.router = param(reg, p + "moe.router", {E, C});
      if (cfg.expert_bias_update_rate > 0.0f) l.bias = param(reg, p + "moe.expert_bias", {E});
      l.w1 = param(reg, p + "moe.experts.w1", {E, F, C});
      l.w3 = param(reg, p + "moe.experts.w3", {E, F, C});
      l.w2 = param(reg, p + "moe.experts.w2", {E, C, F});
      if (cfg.n_shared_experts > 0) {
        const int64_t SF = cfg.n_shared_experts * F;
        l.s_w1 = param(reg, p + "moe.shared.w1", {SF, C});
        l.s_w3 = param(reg, p + "moe.shared.w3", {SF, C});
        l.s_w2 = param(reg, p + "moe.shared.w2", {C, SF});
      }
    }
    l.k_cache = Tensor::empty({max_positions, cfg.n_kv_heads, D}, DType::kF32);
    l.v_cache = Tensor::empty({max_positions, cfg.n_kv_heads, D}, DType::kF32);
    layers_.push_back(std::move(l));
  }
  for (int64_t i = 0; i < D / 2; ++i)
    inv_freq_.push_back(std::pow(static_cast<double>(cfg.rope_theta), -2.0 * static_cast<double>(i) / static_cast<double>(D)));
}

void InferenceModel::attention(Layer& l, const Tensor& h, const std::vector<int64_t>& first) const {
  const int64_t n = h.dim(0), C = cfg_.dim, D = cfg_.head_dim, H = cfg_.n_heads, Hkv = cfg_.n_kv_heads;
  const Tensor xn = Tensor::empty({n, C}, DType::kF32);
  const Tensor rstd = Tensor::empty({n}, DType::kF32);
  ops::rmsnorm_fwd(h, *l.attn_norm, cfg_.norm_eps, xn, rstd);
  const Tensor q = Tensor::empty({n, H, D}, DType::kF32);
  const Tensor k = l.k_cache.rows(pos_, pos_ + n);  // (n, Hkv, D): new keys go straight into the cache
  const Tensor v = l.v_cache.rows(pos_, pos_ + n);
  ops::gemm(xn, false, *l.wq, true, q.reshape({n, H * D}));
  ops::gemm(xn, false, *l.wk, true, k.reshape({n, Hkv * D}));
  ops::gemm(xn, false, *l.wv, true, v.reshape({n, Hkv * D}));
  rope_at(q, pos_, inv_freq_);
  rope_at(k, pos_, inv_freq_);

  // Query t (position pos + t) of head hq attends over cached positions [first[t], pos + t] of kv
  // head hq / (H / Hkv), softmax of scale * q.k, max-subtracted.
  const Tensor out = Tensor::empty({n, H, D}, DType::kF32);
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const float* pq = q.data<float>();
  const float* pk = l.k_cache.data<float>();
  const float* pv = l.v_cache.data<float>();
  float* po = out.data<float>();
  const int64_t group = H / Hkv, pos = pos_;
#pragma omp parallel for collapse(2) schedule(static) if (n * H * (pos + n) * D > (1 << 16))
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t hq = 0; hq < H; ++hq) {
      const int64_t j0 = first[static_cast<size_t>(t)], len = pos + t + 1 - j0, hk = hq / group;
      const float* qi = pq + (t * H + hq) * D;
      std::vector<float> s(static_cast<size_t>(len));
      float mx = -INFINITY;
      for (int64_t j = 0; j < len; ++j) {
        const float* kj = pk + ((j0 + j) * Hkv + hk) * D;
        float dot = 0.0f;
        for (int64_t d = 0; d < D; ++d) dot += qi[d] * kj[d];
        s[static_cast<size_t>(j)] = dot * scale;
        mx = std::max(mx, s[static_cast<size_t>(j)]);
      }
      float sum = 0.0f;
      for (float& x : s) sum += x = std::exp(x - mx);
      float* oi = po + (t * H + hq) * D;
      std::fill(oi, oi + D, 0.0f);
      for (int64_t j = 0; j < len; ++j) {
        const float w = s[static_cast<size_t>(j)] / sum;
        const float* vj = pv + ((j0 + j) * Hkv + hk) * D;
        for (int64_t d = 0; d < D; ++d) oi[d] += w * vj[d];
      }
    }
  }
  ops::gemm(out.reshape({n, H * D}), false, *l.wo, true, h, /*accumulate=*/true);
}

void InferenceModel::ffn(const Layer& l, const Tensor& h) const {
  const int64_t n = h.dim(0), C = cfg_.dim;
  const Tensor xn = Tensor::empty({n, C}, DType::kF32);
  const Tensor rstd = Tensor::empty({n}, DType::kF32);
  ops::rmsnorm_fwd(h, *l.ffn_norm, cfg_.norm_eps, xn, rstd);
  const auto swiglu = [&](const Tensor& w1, const Tensor& w3, const Tensor& w2) {  // h += w2(silu(w1 x) * w3 x)
    const int64_t Fx = w1.dim(0);
    const Tensor gate = Tensor::empty({n, Fx}, DType::kF32), up = Tensor::empty({n, Fx}, DType::kF32);
    ops::gemm(xn, false, w1, true, gate);
    ops::gemm(xn, false, w3, true, up);
    const Tensor act = Tensor::empty({n, Fx}, DType::kF32);
    ops::swiglu_fwd(gate, up, act);
    ops::gemm(act, false, w2, true, h, /*accumulate=*/true);
  };
  if (!l.router) {
    swiglu(*l.w1, *l.w3, *l.w2);
    return;
  }
  const int64_t E = cfg_.n_experts, K = cfg_.top_k, F = cfg_.expert_hidden;
  const Tensor logits = Tensor::empty({n, E}, DType::kF32);
  ops::gemm(xn, false, *l.router, true, logits);
  const Tensor weights = Tensor::empty({n, K}, DType::kF32);
  const Tensor experts = Tensor::empty({n, K}, DType::kI32);
  const Tensor probs = Tensor::empty({n, E}, DType::kF32);
  ops::router_fwd(logits, cfg_.gating, static_cast<int>(K), l.bias ? *l.bias : Tensor(), weights, experts, probs);
  const Tensor positions = Tensor::empty({n, K}, DType::kI32);
  const Tensor offsets = Tensor::empty({E + 1}, DType::kI64);
  ops::moe_plan(experts, static_cast<int>(E), positions, offsets);
  const int64_t M = n * K;
  const Tensor xp = Tensor::empty({M, C}, DType::kF32);
  ops::moe_permute_fwd(xn, positions, xp);
  const Tensor gate = Tensor::empty({M, F}, DType::kF32), up = Tensor::empty({M, F}, DType::kF32);
  ops::grouped_gemm_fwd(xp, *l.w1, offsets, gate);
  ops::grouped_gemm_fwd(xp, *l.w3, offsets, up);
  const Tensor act = Tensor::empty({M, F}, DType::kF32);
  ops::swiglu_fwd(gate, up, act);
  const Tensor y = Tensor::empty({M, C}, DType::kF32);
  ops::grouped_gemm_fwd(act, *l.w2, offsets, y);
  const Tensor out = Tensor::empty({n, C}, DType::kF32);
  ops::moe_unpermute_fwd(y, positions, weights, out);
  ops::add_(h, out);
  if (l.s_w1) swiglu(*l.s_w1, *l.s_w3, *l.s_w2);
}

Tensor InferenceModel::forward(std::span<const int32_t> tokens) {
  const auto n = static_cast<int64_t>(tokens.size());
  MOE_CHECK(n > 0, "InferenceModel::forward: no tokens");
  MOE_CHECK(pos_ + n <= max_pos_, "InferenceModel::forward: positions {}..{} pass the cache length {}", pos_,
            pos_ + n - 1, max_pos_);
  const int64_t C = cfg_.dim, V = cfg_.vocab_size;
  const Tensor ids = Tensor::from_ints({n}, tokens);
  const Tensor h = Tensor::empty({n, C}, DType::kF32);
  ops::embedding_fwd(ids, *embed_, h);
  // The keys each new token sees: its document's (model.document_start_token), within the window.
  std::vector<int64_t> first(static_cast<size_t>(n));
  for (int64_t t = 0; t < n; ++t) {
    if (cfg_.document_start_token >= 0 && tokens[static_cast<size_t>(t)] == cfg_.document_start_token)
      doc_start_ = pos_ + t;
    first[static_cast<size_t>(t)] = doc_start_;
    if (cfg_.sliding_window > 0)
      first[static_cast<size_t>(t)] = std::max(first[static_cast<size_t>(t)], pos_ + t - cfg_.sliding_window + 1);
  }
  for (Layer& l : layers_) {
    attention(l, h, first);
    ffn(l, h);
  }
  const Tensor f = Tensor::empty({n, C}, DType::kF32);
  const Tensor rstd = Tensor::empty({n}, DType::kF32);
  ops::rmsnorm_fwd(h, *final_norm_, cfg_.norm_eps, f, rstd);
  const Tensor logits = Tensor::empty({n, V}, DType::kF32);
  ops::gemm(f, false, *head_, true, logits);
  pos_ += n;
  return logits;
}

}  // namespace moeforge
