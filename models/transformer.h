// The MoE transformer with explicit forward and backward (DESIGN.md, Model):
//   embedding -> L x [attention block, MoE block] -> RMSNorm -> LM head -> cross-entropy.
//
// forward() runs one micro-batch, saves each layer's activations (or, with recomputation, only
// each layer's input) and returns the loss with its terms; backward() then accumulates every
// parameter's gradient into the registry (+=; call registry.zero_grad() between steps).
//
// loss = ce + aux_loss_coef * sum_layers aux + z_loss_coef * sum_layers z, where ce is the mean
// over non-ignored targets (target < 0 is ignored) of the micro-batch.
//
// Tensor parallelism (tp = grid.tp().size()): every TP rank receives the same micro-batch.
// The embedding and the LM head are vocab-parallel (rows of the vocabulary, padded up to a
// multiple of tp, split over TP; padding rows are never looked up and their logits are masked
// out of the loss); the residual stream between them is split by token rows (sequence
// parallelism, parallel/sequence_parallel.h); attention is head-parallel (models/attention.h);
// the MoE block runs whole experts on local rows (models/moe_block.h). Every rank reports the
// same loss. With tp = 1 all of this reduces to the single-rank model.
//
// Expert parallelism (ep = grid.ep().size()): each MoE layer's experts are split over the EP group
// and its tokens travel through the token dispatcher (models/moe_block.h); nothing else changes.
#pragma once

#include <vector>

#include "models/attention.h"
#include "models/model_config.h"
#include "models/moe_block.h"
#include "models/param_registry.h"
#include "parallel/process_grid.h"

namespace moeforge {

struct LossReport {
  double loss = 0.0;  // the optimised total
  double ce = 0.0;    // mean cross-entropy over counted targets
  double aux = 0.0;   // sum over layers of the load-balancing loss (unweighted)
  double z = 0.0;     // sum over layers of the router z-loss (unweighted)
  int64_t targets = 0;  // counted (non-ignored) targets
};

class MoeTransformer {
 public:
  explicit MoeTransformer(const ModelConfig& cfg, const ProcessGrid& grid = ProcessGrid::single());
  MoeTransformer(const MoeTransformer&) = delete;
  MoeTransformer& operator=(const MoeTransformer&) = delete;

  const ModelConfig& config() const { return cfg_; }
  ParamRegistry& registry() { return registry_; }
  const ParamRegistry& registry() const { return registry_; }
  // The vocabulary rounded up to a multiple of tp (rows of the embedding and LM head).
  int64_t padded_vocab() const { return padded_vocab_; }

  // tokens, targets: (B, T) i32, the same on every TP rank; B*T divisible by tp.
  LossReport forward(const Tensor& tokens, const Tensor& targets);
  // Accumulates loss_scale * d loss / d parameter for the loss of the last forward() and releases
  // its activations. Gradient accumulation over micro-batches passes 1 / micro_batches.
  void backward(float loss_scale = 1.0f);
  // Next-token logits (B, T, V) for tokens (B, T) i32, on every TP rank, without keeping anything
  // for backward.
  Tensor logits(const Tensor& tokens);
  // Per layer, the experts chosen for this rank's rows in the last forward(): (Nl, K) i32 each.
  std::vector<Tensor> last_routing() const;
  // Expert load of the last forward(): (L, E+1) i64, row i = layer i's token copies routed to each
  // expert over the whole micro-batch (before capacity drops), then the copies dropped. Every TP
  // rank holds the same numbers.
  const Tensor& last_load() const { return last_load_; }
  // Aux-loss-free balancing: moves each layer's expert bias from load (L, E+1) i64 summed over
  // the step's global batch (the same on every rank). No-op when the bias is off.
  void update_expert_bias(const Tensor& load);

 private:
  struct LayerActs {
    Tensor h_in;   // (Nl, C)
    Tensor h_mid;  // (Nl, C) between the attention and MoE blocks
    AttentionActs attn;
    MoeActs moe;
  };
  void layer_forward(int i, const Tensor& h_in, const Tensor& h_out, LayerActs& acts) const;
  // Embedding, layers and final norm for tokens (B, T): fills acts_, sets f_rows_/f_rstd_/h_final_
  // and returns the normalised final hidden state of all N rows (N, C), plus this rank's partial
  // aux / z sums.
  Tensor run_trunk(const Tensor& tokens, double& aux, double& z);
  // Logits of this rank's vocabulary rows (N, Vl) for the final hidden state f (N, C).
  Tensor head_logits(const Tensor& f) const;
  const Param& head() const;
  int64_t vocab_start() const;   // first vocabulary row of this TP rank
  int64_t vocab_valid() const;   // real (non-padding) rows of this TP rank

  ModelConfig cfg_;
  ProcessGrid grid_;
  int64_t padded_vocab_;
  ParamRegistry registry_;
  Param* embed_ = nullptr;       // (Vl, C) of global (V_pad, C)
  Param* final_norm_ = nullptr;  // (C)
  Param* lm_head_ = nullptr;     // (Vl, C), null when tied to embed_
  std::vector<AttentionBlock> attn_;
  std::vector<MoeBlock> moe_;

  // Saved by forward() for backward().
  Tensor tokens_;      // (N) i32
  Tensor targets_;     // (N) i32
  int64_t batch_ = 0, seq_ = 0, counted_ = 0;
  std::vector<LayerActs> acts_;
  Tensor h_final_;     // (Nl, C) input of the final norm
  Tensor f_rstd_;      // (Nl)
  Tensor f_;           // (N, C) normalised, all rows
  Tensor logits_;      // (N, Vl)
  Tensor lse_;         // (N)
  Tensor last_load_;   // (L, E+1) i64
};

}  // namespace moeforge
