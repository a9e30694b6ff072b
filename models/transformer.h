// The MoE transformer with explicit forward and backward (DESIGN.md, Model):
//   embedding -> L x [attention block, MoE block] -> RMSNorm -> LM head -> cross-entropy.
//
// forward() runs the whole batch, saves each layer's activations (or, with recomputation, only
// each layer's input) and returns the loss with its terms; backward() then accumulates every
// parameter's gradient into the registry (+=; call registry.zero_grad() between steps).
//
// loss = ce + aux_loss_coef * sum_layers aux + z_loss_coef * sum_layers z, where ce is the mean
// over non-ignored targets (target < 0 is ignored).
#pragma once

#include <vector>

#include "models/attention.h"
#include "models/model_config.h"
#include "models/moe_block.h"
#include "models/param_registry.h"

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
  explicit MoeTransformer(const ModelConfig& cfg, ShardLayout layout = {});
  MoeTransformer(const MoeTransformer&) = delete;
  MoeTransformer& operator=(const MoeTransformer&) = delete;

  const ModelConfig& config() const { return cfg_; }
  ParamRegistry& registry() { return registry_; }
  const ParamRegistry& registry() const { return registry_; }

  // tokens, targets: (B, T) i32.
  LossReport forward(const Tensor& tokens, const Tensor& targets);
  // Accumulates loss_scale * d loss / d parameter for the loss of the last forward() and releases
  // its activations. Gradient accumulation over micro-batches passes 1 / micro_batches.
  void backward(float loss_scale = 1.0f);
  // Next-token logits (B, T, V) for tokens (B, T) i32, without keeping anything for backward.
  Tensor logits(const Tensor& tokens);
  // Per layer, the experts chosen in the last forward(): (N, K) i32 each.
  std::vector<Tensor> last_routing() const;

 private:
  struct LayerActs {
    Tensor h_in;   // (B, T, C)
    Tensor h_mid;  // (B, T, C) between the attention and MoE blocks
    AttentionActs attn;
    MoeActs moe;
  };
  void layer_forward(int i, const Tensor& h_in, const Tensor& h_out, LayerActs& acts) const;
  // Embedding and layers for tokens (B, T); fills acts_ and returns the last hidden state
  // (B, T, C) and the summed aux / z losses.
  Tensor run_layers(const Tensor& tokens, double& aux, double& z);
  const Param& head() const;

  ModelConfig cfg_;
  ParamRegistry registry_;
  Param* embed_ = nullptr;       // (V, C)
  Param* final_norm_ = nullptr;  // (C)
  Param* lm_head_ = nullptr;     // (V, C), null when tied to embed_
  std::vector<AttentionBlock> attn_;
  std::vector<MoeBlock> moe_;

  // Saved by forward() for backward().
  Tensor tokens_;      // (N) i32
  Tensor targets_;     // (N) i32
  int64_t batch_ = 0, seq_ = 0, counted_ = 0;
  std::vector<LayerActs> acts_;
  Tensor h_final_;     // (N, C) input of the final norm
  Tensor f_;           // (N, C) normalised
  Tensor f_rstd_;      // (N)
  Tensor logits_;      // (N, V)
  Tensor lse_;         // (N)
};

}  // namespace moeforge
