// A dense feed-forward half of a transformer layer, for models whose first layers are not MoE
// (DeepSeek-style `first_k_dense`): h_out = h_in + w2 · (silu(w1 · x) * (w3 · x)), x = rmsnorm(h_in).
//
// Parameters: layers.{i}.ffn_norm.weight (C), layers.{i}.ffn.{w1,w3} (Fd, C), layers.{i}.ffn.w2
// (C, Fd). Under tensor parallelism they are whole on every rank and run on this rank's token rows
// (sequence parallelism), like the shared experts, so their gradients are partial over TP.
//
// Gradient rule: parameter gradients accumulate (+=), activation gradients are written (=).
#pragma once

#include "models/model_config.h"
#include "models/param_registry.h"

namespace moeforge {

struct DenseActs {
  Tensor h_in;  // (N, C)
  Tensor xn;    // (N, C)
  Tensor rstd;  // (N)
  Tensor gate;  // (N, Fd)
  Tensor up;    // (N, Fd)
  Tensor act;   // (N, Fd)
};

class DenseFfnBlock {
 public:
  DenseFfnBlock(const ModelConfig& cfg, ParamRegistry& registry, int layer);

  void forward(const Tensor& h_in, const Tensor& h_out, DenseActs& acts) const;
  void backward(const Tensor& dh_out, const Tensor& dh_in, const DenseActs& acts) const;

 private:
  const ModelConfig& cfg_;
  Param* norm_;  // (C)
  Param* w1_;    // (Fd, C)
  Param* w3_;    // (Fd, C)
  Param* w2_;    // (C, Fd)
};

}  // namespace moeforge
