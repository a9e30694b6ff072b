// The attention half of a transformer layer: h_out = h_in + wo · attn(rope(wq·x), rope(wk·x), wv·x)
// with x = rmsnorm(h_in). Causal grouped-query attention, RoPE in the HF convention.
//
// Tensor parallelism (Megatron style, with sequence parallelism): the block input and output are
// this rank's token rows (N/tp of the micro-batch's N = B*T, parallel/sequence_parallel.h). The
// normalised rows are gathered to all N rows, q/k/v are column-parallel (this rank's H/tp query
// heads and Hkv/tp kv heads), and the output projection is row-parallel: its partial sums are
// reduce-scattered back to this rank's rows. With tp = 1 both boundaries are no-ops.
//
// Gradient rule: parameter gradients accumulate (+=), activation gradients are written (=).
#pragma once

#include "models/model_config.h"
#include "models/param_registry.h"
#include "parallel/comm.h"

namespace moeforge {

// What forward saves for backward. N = B*T rows of the micro-batch, Nl = N / tp local rows,
// Hl = H / tp and Hkvl = Hkv / tp local heads.
struct AttentionActs {
  Tensor h_in;  // (Nl, C) the block input, also the residual
  Tensor rstd;  // (Nl)
  Tensor xn;    // (N, C) normalised input, all rows
  Tensor q;     // (B, T, Hl, D) after RoPE
  Tensor k;     // (B, T, Hkvl, D) after RoPE
  Tensor v;     // (B, T, Hkvl, D)
  Tensor out;   // (B, T, Hl, D) attention output before wo
  Tensor lse;   // (B, Hl, T)
  ops::AttentionMask mask;  // the forward's (window, documents), for the backward
};

class AttentionBlock {
 public:
  AttentionBlock(const ModelConfig& cfg, ParamRegistry& registry, Comm& tp, int layer);

  // h_in, h_out: (Nl, C) for a micro-batch of B sequences of T tokens; mask: which keys each query
  // sees besides the causal rule (MoeTransformer::attention_mask).
  void forward(int64_t B, int64_t T, const Tensor& h_in, const Tensor& h_out, const ops::AttentionMask& mask,
               AttentionActs& acts) const;
  // dh_out (Nl, C) -> dh_in (Nl, C) written; parameter gradients accumulated.
  void backward(const Tensor& dh_out, const Tensor& dh_in, const AttentionActs& acts) const;

 private:
  const ModelConfig& cfg_;
  Comm& tp_;
  int64_t heads_, kv_heads_;  // local: H / tp, Hkv / tp
  Param* norm_;  // (C)
  Param* wq_;    // (Hl*D, C) of global (H*D, C)
  Param* wk_;    // (Hkvl*D, C)
  Param* wv_;    // (Hkvl*D, C)
  Param* wo_;    // (C, Hl*D) of global (C, H*D)
};

}  // namespace moeforge
