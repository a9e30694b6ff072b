// The attention half of a transformer layer: h_out = h_in + wo · attn(rope(wq·x), rope(wk·x), wv·x)
// with x = rmsnorm(h_in). Causal grouped-query attention, RoPE in the HF convention.
//
// Gradient rule: parameter gradients accumulate (+=), activation gradients are written (=).
#pragma once

#include "models/model_config.h"
#include "models/param_registry.h"

namespace moeforge {

// What forward saves for backward. Row count N = B*T.
struct AttentionActs {
  Tensor h_in;  // (B, T, C) the block input, also the residual
  Tensor xn;    // (N, C) normalised input
  Tensor rstd;  // (N)
  Tensor q;     // (B, T, H, D) after RoPE
  Tensor k;     // (B, T, Hkv, D) after RoPE
  Tensor v;     // (B, T, Hkv, D)
  Tensor out;   // (B, T, H, D) attention output before wo
  Tensor lse;   // (B, H, T)
};

class AttentionBlock {
 public:
  AttentionBlock(const ModelConfig& cfg, ParamRegistry& registry, int layer);

  // h_in, h_out: (B, T, C).
  void forward(const Tensor& h_in, const Tensor& h_out, AttentionActs& acts) const;
  // dh_out (B, T, C) -> dh_in (B, T, C) written; parameter gradients accumulated.
  void backward(const Tensor& dh_out, const Tensor& dh_in, const AttentionActs& acts) const;

 private:
  const ModelConfig& cfg_;
  Param* norm_;  // (C)
  Param* wq_;    // (H*D, C)
  Param* wk_;    // (Hkv*D, C)
  Param* wv_;    // (Hkv*D, C)
  Param* wo_;    // (C, H*D)
};

}  // namespace moeforge
