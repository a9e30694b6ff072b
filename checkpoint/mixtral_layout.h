// The Hugging Face Mixtral layout of a moeforge model (shared/formats.md §2): which HF tensor holds
// which parameter, config.json in both directions, what Mixtral cannot express, and the q/k row
// permutation GGUF's llama architecture needs (§3.8).
//
// Our canonical parameters are Mixtral's tensors under other names, except that the experts of a
// layer are one (E, F, C) / (E, C, F) parameter where HF stores one tensor per expert: expert e
// is row e of dim 0. Attention uses the same RoPE convention (half split), so the HF export is a
// rename; no values change.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "models/model_config.h"

namespace moeforge::checkpoint {

// One HF tensor and where its values are in moeforge's parameters.
struct HfTensor {
  std::string hf_name;         // "model.layers.0.self_attn.q_proj.weight"
  std::string param;           // "layers.0.attn.wq"
  int64_t expert = -1;         // >= 0: the tensor is row `expert` of dim 0 of `param`
  std::vector<int64_t> shape;  // the HF shape ([out, in] for linear weights)
};

// Every HF tensor of the model, in model order (embedding, layers, final norm, head). The LM head
// is left out for tied embeddings, as HF does.
std::vector<HfTensor> mixtral_tensors(const ModelConfig& cfg);

// Throws, naming `target` ("HF Mixtral", "GGUF llama") and the feature, when the model computes
// something that architecture cannot: sigmoid gating, shared experts, an expert selection bias.
void check_mixtral_expressible(const ModelConfig& cfg, const std::string& target);

// Our aux loss is HF's load_balancing_loss_func divided by top_k, summed over layers where HF
// averages over the concatenated layers: for equal per-layer statistics HF's term
// router_aux_loss_coef * hf_loss equals ours when router_aux_loss_coef = ours * n_layers / top_k.
double hf_aux_coef(const ModelConfig& cfg);

// config.json of MixtralForCausalLM. Floats are written as their shortest decimal, so import
// reads back exactly the float that was exported.
nlohmann::ordered_json mixtral_config_json(const ModelConfig& cfg, int64_t max_seq_len, const std::string& torch_dtype);

// The model a Mixtral config.json describes (softmax top-k gating, no shared experts); throws
// naming `where` and the key for anything missing, mistyped, or not expressible in moeforge.
struct HfModel {
  ModelConfig model;
  int64_t max_seq_len = 0;
};
HfModel model_from_mixtral_config(const nlohmann::json& config, const std::string& where);

// The HF -> GGUF llama permutation of q or k rows: rows of (n_heads * head_dim, cols), per head
// viewed as (2, head_dim / 2) and transposed, so ggml's adjacent-pair RoPE rotates HF's pairs
// (i, i + head_dim / 2). Output row 2j + t of a head is input row t * head_dim / 2 + j.
std::vector<float> permute_qk_rows(const std::vector<float>& w, int64_t n_heads, int64_t head_dim, int64_t cols);

}  // namespace moeforge::checkpoint
