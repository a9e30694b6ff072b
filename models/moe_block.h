// The MoE half of a transformer layer: h_out = h_in + moe(rmsnorm(h_in)).
//
// Token path (DESIGN.md): router logits -> gating + top-k -> plan (token copies grouped by
// expert) -> permute -> grouped expert GEMMs (SwiGLU: w1 gate, w3 up, w2 down) -> unpermute with
// weighted combine; plus the always-on shared experts when configured. Expert parallelism will
// insert its all-to-all between permute and the expert GEMMs without changing this sequence.
//
// Loss terms: the layer's load-balancing loss and router z-loss are computed in forward and
// reported (MoeActs::aux, ::z); backward adds their gradients scaled by the config coefficients.
//
// Sequence parallelism: the block sees only this rank's Nl = N / tp token rows. Expert and router
// weights are whole on every TP rank (expert TP = 1), so tokens never leave the rank here; the
// load-balancing statistics are made global by summing the per-expert counts over the TP group,
// and the losses computed from local rows are partial sums the model adds up over TP.
//
// Gradient rule: parameter gradients accumulate (+=), activation gradients are written (=).
#pragma once

#include "models/model_config.h"
#include "models/param_registry.h"
#include "parallel/comm.h"

namespace moeforge {

// What forward saves for backward. N = Nl local token rows here, M = N*K token copies.
struct MoeActs {
  Tensor h_in;       // (N, C)
  Tensor xn;         // (N, C)
  Tensor rstd;       // (N)
  Tensor logits;     // (N, E) router logits
  Tensor weights;    // (N, K) combine weights
  Tensor experts;    // (N, K) i32 selected experts
  Tensor probs;      // (N, E) distribution used by the aux loss
  Tensor positions;  // (N, K) i32 row of each copy in the expert-grouped buffer
  Tensor offsets;    // (E+1) i64
  Tensor counts;     // (E) i64 copies per expert over the whole micro-batch (summed over TP)
  int64_t tokens = 0;  // tokens of the whole micro-batch (N * tp)
  Tensor xp;         // (M, C) permuted input
  Tensor gate;       // (M, F) xp · w1ᵀ
  Tensor up;         // (M, F) xp · w3ᵀ
  Tensor act;        // (M, F) silu(gate) * up
  Tensor y;          // (M, C) expert outputs
  Tensor s_gate;     // (N, S*F) shared experts, when S > 0
  Tensor s_up;       // (N, S*F)
  Tensor s_act;      // (N, S*F)
  double aux = 0.0;  // this rank's part of the layer's load-balancing loss (sum over TP = the loss)
  double z = 0.0;    // this rank's part of the layer's router z-loss
};

class MoeBlock {
 public:
  MoeBlock(const ModelConfig& cfg, ParamRegistry& registry, Comm& tp, int layer);

  // h_in, h_out: (Nl, C), this rank's token rows.
  void forward(const Tensor& h_in, const Tensor& h_out, MoeActs& acts) const;
  // dh_out (Nl, C) -> dh_in (Nl, C) written; parameter gradients accumulated, including those
  // of loss_scale * (cfg.aux_loss_coef * aux + cfg.z_loss_coef * z).
  void backward(const Tensor& dh_out, const Tensor& dh_in, const MoeActs& acts, float loss_scale) const;

 private:
  const ModelConfig& cfg_;
  Comm& tp_;
  Param* norm_;      // (C)
  Param* router_;    // (E, C)
  Param* w1_;        // (E, F, C)
  Param* w3_;        // (E, F, C)
  Param* w2_;        // (E, C, F)
  Param* s_w1_ = nullptr;  // (S*F, C)
  Param* s_w3_ = nullptr;  // (S*F, C)
  Param* s_w2_ = nullptr;  // (C, S*F)
};

}  // namespace moeforge
