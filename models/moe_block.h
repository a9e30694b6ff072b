// The MoE half of a transformer layer: h_out = h_in + moe(rmsnorm(h_in)).
//
// Token path (DESIGN.md): router logits -> gating + top-k -> plan (token copies grouped by
// expert) -> permute -> grouped expert GEMMs (SwiGLU: w1 gate, w3 up, w2 down) -> unpermute with
// weighted combine; plus the always-on shared experts when configured.
//
// Expert parallelism (grid.ep() of size ep): this rank holds experts [ep_rank * El, (ep_rank+1) *
// El) of the layer, El = E / ep. Between permute and the expert GEMMs the token dispatcher
// (models/token_dispatcher.h) sends each copy to the rank owning its expert, and after them brings
// the outputs back, so routing, combine and every loss see the same numbers as with ep = 1.
//
// Capacity mode (cfg.capacity_factor > 0): each expert takes at most
//   capacity = ceil(capacity_factor * tokens * K / E)
// copies of the micro-batch (tokens = all rows of the micro-batch, over the TP group). Copies are
// ranked per expert in priority order — every token's first choice before any second choice,
// then by token row over the whole micro-batch (the TP ranks' rows in rank order) — and those
// ranked at or past the capacity are dropped: they skip the experts and contribute nothing to
// the combine (their tokens keep the residual and the shared experts). Because the rule is
// global to the micro-batch, any layout drops exactly the copies a single rank would.
//
// Aux-loss-free balancing (cfg.expert_bias_update_rate > 0): a non-trainable per-expert bias
// (`layers.{i}.moe.expert_bias`) is added to the routing scores for selection only;
// update_bias() moves it after each optimizer step from the step's global expert loads.
//
// Loss terms: the layer's load-balancing loss and router z-loss are computed in forward and
// reported (MoeActs::aux, ::z); backward adds their gradients scaled by the config coefficients.
//
// Sequence parallelism: the block sees only this rank's Nl = N / tp token rows. Router weights are
// whole on every TP rank and experts are never split inside (expert TP = 1); the load-balancing
// statistics are made global by summing the per-expert counts over the TP group, and the losses
// computed from local rows are partial sums the model adds up over TP.
//
// Devices (models/device_tensors.h): the block runs on the device of its input. The host reads
// the per-expert counts (they size the buffers and the EP exchange; capacity ranks them), the two
// router losses, and updates the expert bias; each is one explicit copy on a GPU.
//
// Gradient rule: parameter gradients accumulate (+=), activation gradients are written (=).
#pragma once

#include "models/model_config.h"
#include "models/param_registry.h"
#include "models/token_dispatcher.h"
#include "parallel/process_grid.h"

namespace moeforge {

// What forward saves for backward. N = Nl local token rows here, M <= N*K kept token copies,
// R the copies this rank's experts received over the EP group. Tensors live on the device of the
// block's input, except counts_host.
struct MoeActs {
  Tensor h_in;       // (N, C)
  Tensor xn;         // (N, C)
  Tensor rstd;       // (N)
  Tensor logits;     // (N, E) router logits
  Tensor weights;    // (N, K) combine weights
  Tensor experts;    // (N, K) i32 selected experts
  Tensor lse;        // (N) logsumexp of each logits row (the z-loss and its gradient)
  Tensor positions;  // (N, K) i32 row of each copy in the expert-grouped buffer, -1 if dropped
  Tensor counts;     // (E) i64 copies routed to each expert over the whole micro-batch (before drops)
  Tensor counts_host;  // the same counts on the host (loads); the same tensor as counts on the CPU
  int64_t tokens = 0;   // tokens of the whole micro-batch (N * tp)
  int64_t dropped = 0;  // copies of the whole micro-batch dropped by the capacity
  DispatchPlan plan;    // EP exchange; plan.local_offsets (El+1) groups the R rows by local expert
  Tensor xl;         // (R, C) expert inputs on this rank
  Tensor gate;       // (R, F) xl · w1ᵀ
  Tensor up;         // (R, F) xl · w3ᵀ
  Tensor act;        // (R, F) silu(gate) * up
  Tensor y;          // (M, C) expert outputs, back in this rank's expert-grouped order
  Tensor s_gate;     // (N, S*F) shared experts, when S > 0
  Tensor s_up;       // (N, S*F)
  Tensor s_act;      // (N, S*F)
  double aux = 0.0;  // this rank's part of the layer's load-balancing loss (sum over TP = the loss)
  double z = 0.0;    // this rank's part of the layer's router z-loss
};

class MoeBlock {
 public:
  MoeBlock(const ModelConfig& cfg, ParamRegistry& registry, const ProcessGrid& grid, int layer);

  // h_in, h_out: (Nl, C), this rank's token rows.
  void forward(const Tensor& h_in, const Tensor& h_out, MoeActs& acts) const;
  // dh_out (Nl, C) -> dh_in (Nl, C) written; parameter gradients accumulated, including those
  // of loss_scale * (cfg.aux_loss_coef * aux + cfg.z_loss_coef * z).
  void backward(const Tensor& dh_out, const Tensor& dh_in, const MoeActs& acts, float loss_scale) const;

  // Aux-loss-free balancing: load (E) = copies routed to each expert over the step's global
  // batch, the same on every rank; b_e += rate * sign(mean load - load_e). No-op without a bias.
  void update_bias(const int64_t* load);

 private:
  // Selection with capacity: fills a.counts and a.dropped and returns the experts to dispatch
  // (N, K), -1 for a dropped copy.
  Tensor apply_capacity(MoeActs& a) const;

  const ModelConfig& cfg_;
  Comm& tp_;
  Comm& ep_;
  Param* norm_;      // (C)
  Param* router_;    // (E, C)
  Param* bias_ = nullptr;  // (E) non-trainable selection bias, when aux-loss-free balancing is on
  Param* w1_;        // (El, F, C) of global (E, F, C)
  Param* w3_;        // (El, F, C)
  Param* w2_;        // (El, C, F)
  Param* s_w1_ = nullptr;  // (S*F, C)
  Param* s_w3_ = nullptr;  // (S*F, C)
  Param* s_w2_ = nullptr;  // (C, S*F)
};

}  // namespace moeforge
