// The model's hyper-parameters. launch/ fills this from the run configuration; the model and the
// parameter registry read nothing else.
#pragma once

#include <cstdint>

#include "runtime/ops.h"

namespace moeforge {

struct ModelConfig {
  int64_t vocab_size = 259;     // V (byte-level tokenizer: 256 bytes + BOS/EOS/PAD)
  int64_t dim = 64;             // C
  int n_layers = 2;
  int n_heads = 4;              // H
  int n_kv_heads = 2;           // Hkv
  int64_t head_dim = 16;        // D (q has H*D features; need not equal C)
  int n_experts = 4;            // E
  int top_k = 2;                // K
  int64_t expert_hidden = 128;  // F, hidden width of each routed expert
  int n_shared_experts = 0;     // S always-on experts of width F, run as one SwiGLU of width S*F
  int n_dense_layers = 0;       // the first layers use a dense SwiGLU FFN instead of MoE
  int64_t dense_hidden = 256;   // Fd, hidden width of the dense FFN
  ops::Gating gating = ops::Gating::kSoftmaxTopK;
  float rope_theta = 10000.0f;
  float norm_eps = 1e-5f;
  bool tie_embeddings = false;
  float aux_loss_coef = 0.01f;  // weight of the summed per-layer load-balancing losses
  float z_loss_coef = 0.0f;     // weight of the summed per-layer router z-losses
  float init_std = 0.02f;
  bool recompute = false;       // per-layer activation recomputation
  float capacity_factor = 0.0f;          // > 0: capacity mode (configs/moeforge.proto); 0: dropless
  float expert_bias_update_rate = 0.0f;  // > 0: aux-loss-free balancing bias, updated per step
  int64_t sliding_window = 0;            // > 0: a query sees its last sliding_window keys (itself included)
  int document_start_token = -1;         // >= 0: this token id starts a document; attention stays inside
  // The dtype of the forward/backward: f32, or bf16 mixed precision (bf16 weight copies and
  // activations; fp32 master weights, gradients and optimizer state). Set from train.precision.
  DType compute_dtype = DType::kF32;

  // Throws moeforge::Error naming the first inconsistent field.
  void validate() const;
};

}  // namespace moeforge
