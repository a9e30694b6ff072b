#include "models/model_config.h"

#include <cmath>

namespace moeforge {

void ModelConfig::validate() const {
  MOE_CHECK(vocab_size > 0, "model.vocab_size must be positive, got {}", vocab_size);
  MOE_CHECK(dim > 0, "model.dim must be positive, got {}", dim);
  MOE_CHECK(n_layers > 0, "model.n_layers must be positive, got {}", n_layers);
  MOE_CHECK(n_heads > 0, "model.n_heads must be positive, got {}", n_heads);
  MOE_CHECK(n_kv_heads > 0 && n_heads % n_kv_heads == 0,
            "model.n_heads ({}) must be a positive multiple of model.n_kv_heads ({})", n_heads, n_kv_heads);
  MOE_CHECK(head_dim > 0 && head_dim % 2 == 0, "model.head_dim must be positive and even (RoPE rotates pairs), got {}",
            head_dim);
  MOE_CHECK(n_experts > 0, "model.n_experts must be positive, got {}", n_experts);
  MOE_CHECK(top_k >= 1 && top_k <= n_experts, "model.top_k ({}) must be in [1, model.n_experts = {}]", top_k,
            n_experts);
  MOE_CHECK(expert_hidden > 0, "model.expert_hidden must be positive, got {}", expert_hidden);
  MOE_CHECK(n_dense_layers >= 0 && n_dense_layers <= n_layers, "model.n_dense_layers ({}) must be in [0, model.n_layers = {}]",
            n_dense_layers, n_layers);
  MOE_CHECK(n_dense_layers == 0 || dense_hidden > 0, "model.dense_hidden must be positive, got {}", dense_hidden);
  MOE_CHECK(n_shared_experts >= 0, "model.n_shared_experts must be >= 0, got {}", n_shared_experts);
  MOE_CHECK(rope_theta > 0.0f, "model.rope_theta must be positive, got {}", rope_theta);
  MOE_CHECK(norm_eps > 0.0f, "model.norm_eps must be positive, got {}", norm_eps);
  MOE_CHECK(aux_loss_coef >= 0.0f, "model.aux_loss_coef must be >= 0, got {}", aux_loss_coef);
  MOE_CHECK(z_loss_coef >= 0.0f, "model.z_loss_coef must be >= 0, got {}", z_loss_coef);
  MOE_CHECK(capacity_factor >= 0.0f && std::isfinite(capacity_factor),
            "model.capacity_factor must be finite and >= 0, got {}", capacity_factor);
  MOE_CHECK(expert_bias_update_rate >= 0.0f && std::isfinite(expert_bias_update_rate),
            "model.expert_bias_update_rate must be finite and >= 0, got {}", expert_bias_update_rate);
  MOE_CHECK(init_std > 0.0f, "model.init_std must be positive, got {}", init_std);
  MOE_CHECK(sliding_window >= 0, "model.sliding_window must be >= 0 (0: none), got {}", sliding_window);
  MOE_CHECK(document_start_token >= -1 && document_start_token < vocab_size,
            "model.document_start_token must be -1 (off) or a token id in [0, {}), got {}", vocab_size,
            document_start_token);
}

}  // namespace moeforge
