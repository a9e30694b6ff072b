// Autoregressive inference with a KV cache: the decode path of `moeforge generate`.
//
// InferenceModel runs the transformer of models/transformer.h over new tokens only: each call
// takes the next n tokens (the prompt in one call, then one token per call), computes their keys
// and values once, appends them to a per-layer cache (Tmax, Hkv, D) and attends over everything
// cached so far. It is built from the op catalog (embedding, RMSNorm, GEMM, router, MoE
// permute / grouped GEMM / SwiGLU / unpermute) and reads the parameters from a registry by their
// canonical names; two steps are its own because the catalog's versions assume a sequence that
// starts at position 0 with as many keys as queries: RoPE at an offset position, and attention of
// n new queries over p + n cached keys. Both follow the catalog's conventions exactly (the HF
// half-split RoPE with double-precision angles; causal GQA with scale 1/sqrt(D)), so the logits
// equal MoeTransformer::logits of the whole sequence up to f32 rounding.
//
// The registry must be a single-rank one (tp = ep = pp = 1: every parameter whole, no padding
// rows); the model holds references into it. Routing is dropless (no capacity), as at inference
// in every other framework. Not thread-safe; one sequence at a time.
#pragma once

#include <span>
#include <vector>

#include "models/model_config.h"
#include "models/param_registry.h"

namespace moeforge {

class InferenceModel {
 public:
  // max_positions: the cache length Tmax (the longest sequence forward() can reach).
  InferenceModel(const ModelConfig& cfg, const ParamRegistry& registry, int64_t max_positions);

  // Runs tokens at positions [position(), position() + n) and caches their keys and values.
  // Returns the next-token logits (n, V). Throws when the cache would overflow.
  Tensor forward(std::span<const int32_t> tokens);
  int64_t position() const { return pos_; }
  int64_t max_positions() const { return max_pos_; }
  // Empties the cache: the next forward() starts at position 0.
  void reset() {
    pos_ = 0;
    doc_start_ = 0;
  }
  const ModelConfig& config() const { return cfg_; }

 private:
  struct Layer {
    const Tensor* attn_norm;  // (C)
    const Tensor *wq, *wk, *wv, *wo;  // (H*D, C), (Hkv*D, C), (Hkv*D, C), (C, H*D)
    const Tensor* ffn_norm;   // (C) moe_norm or the dense FFN's norm
    const Tensor* router = nullptr;  // (E, C); null for a dense layer
    const Tensor* bias = nullptr;    // (E) expert selection bias, when the model has one
    const Tensor *w1, *w3, *w2;      // (E, F, C), (E, F, C), (E, C, F), or dense (Fd, C), (Fd, C), (C, Fd)
    const Tensor *s_w1 = nullptr, *s_w3 = nullptr, *s_w2 = nullptr;  // shared experts (S*F, C), (C, S*F)
    Tensor k_cache, v_cache;  // (Tmax, Hkv, D)
  };
  // first[t]: the first cached position new token t sees (its document's start, or the window's).
  void attention(Layer& l, const Tensor& h, const std::vector<int64_t>& first) const;
  void ffn(const Layer& l, const Tensor& h) const;

  ModelConfig cfg_;
  int64_t max_pos_;
  int64_t pos_ = 0;
  int64_t doc_start_ = 0;  // position of the last document_start_token seen (model.document_start_token)
  const Tensor* embed_;       // (V, C)
  const Tensor* final_norm_;  // (C)
  const Tensor* head_;        // (V, C): lm_head, or embed when tied
  std::vector<Layer> layers_;
  std::vector<double> inv_freq_;  // (D/2) theta^(-2i/D)
};

}  // namespace moeforge
