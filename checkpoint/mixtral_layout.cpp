#include "checkpoint/mixtral_layout.h"

#include <fmt/format.h>

#include "runtime/error.h"

namespace moeforge::checkpoint {

namespace {
// The float as its shortest round-trip decimal, read as a double: JSON shows "1e-05", not
// "9.999999747378752e-06", and reading it back as a float gives the same float.
double json_float(float f) { return std::stod(fmt::format("{}", f)); }
}  // namespace

std::vector<HfTensor> mixtral_tensors(const ModelConfig& c) {
  const int64_t C = c.dim, F = c.expert_hidden, HD = c.n_heads * c.head_dim, KD = c.n_kv_heads * c.head_dim;
  std::vector<HfTensor> out;
  out.push_back({"model.embed_tokens.weight", "embed.weight", -1, {c.vocab_size, C}});
  for (int i = 0; i < c.n_layers; ++i) {
    const std::string h = fmt::format("model.layers.{}.", i), m = fmt::format("layers.{}.", i);
    out.push_back({h + "input_layernorm.weight", m + "attn_norm.weight", -1, {C}});
    out.push_back({h + "self_attn.q_proj.weight", m + "attn.wq", -1, {HD, C}});
    out.push_back({h + "self_attn.k_proj.weight", m + "attn.wk", -1, {KD, C}});
    out.push_back({h + "self_attn.v_proj.weight", m + "attn.wv", -1, {KD, C}});
    out.push_back({h + "self_attn.o_proj.weight", m + "attn.wo", -1, {C, HD}});
    out.push_back({h + "post_attention_layernorm.weight", m + "moe_norm.weight", -1, {C}});
    out.push_back({h + "block_sparse_moe.gate.weight", m + "moe.router", -1, {c.n_experts, C}});
    for (int e = 0; e < c.n_experts; ++e) {
      const std::string x = fmt::format("{}block_sparse_moe.experts.{}.", h, e);
      out.push_back({x + "w1.weight", m + "moe.experts.w1", e, {F, C}});
      out.push_back({x + "w2.weight", m + "moe.experts.w2", e, {C, F}});
      out.push_back({x + "w3.weight", m + "moe.experts.w3", e, {F, C}});
    }
  }
  out.push_back({"model.norm.weight", "final_norm.weight", -1, {C}});
  if (!c.tie_embeddings) out.push_back({"lm_head.weight", "lm_head.weight", -1, {c.vocab_size, C}});
  return out;
}

void check_mixtral_expressible(const ModelConfig& c, const std::string& target) {
  MOE_CHECK(c.gating == ops::Gating::kSoftmaxTopK,
            "cannot export to {}: the model uses {} gating; Mixtral's router is a softmax over all experts, top-k, "
            "renormalised, and another gating would change the model's outputs",
            target, ops::gating_name(c.gating));
  MOE_CHECK(c.n_shared_experts == 0,
            "cannot export to {}: the model has {} shared (always-on) expert(s), which Mixtral has no tensor for",
            target, c.n_shared_experts);
  MOE_CHECK(c.expert_bias_update_rate == 0.0f,
            "cannot export to {}: the model selects experts with an aux-loss-free balancing bias "
            "(model.expert_bias_update_rate = {}), which Mixtral's router has no place for",
            target, c.expert_bias_update_rate);
  MOE_CHECK(c.n_dense_layers == 0,
            "cannot export to {}: the first {} layer(s) use a dense FFN; every Mixtral layer is a sparse MoE block",
            target, c.n_dense_layers);
}

double hf_aux_coef(const ModelConfig& c) { return json_float(c.aux_loss_coef) * c.n_layers / c.top_k; }

nlohmann::ordered_json mixtral_config_json(const ModelConfig& c, int64_t max_seq_len, const std::string& torch_dtype) {
  nlohmann::ordered_json j;
  j["architectures"] = {"MixtralForCausalLM"};
  j["model_type"] = "mixtral";
  j["vocab_size"] = c.vocab_size;
  j["hidden_size"] = c.dim;
  j["intermediate_size"] = c.expert_hidden;
  j["num_hidden_layers"] = c.n_layers;
  j["num_attention_heads"] = c.n_heads;
  j["num_key_value_heads"] = c.n_kv_heads;
  j["head_dim"] = c.head_dim;
  j["num_local_experts"] = c.n_experts;
  j["num_experts_per_tok"] = c.top_k;
  j["hidden_act"] = "silu";
  j["rms_norm_eps"] = json_float(c.norm_eps);
  j["rope_theta"] = json_float(c.rope_theta);
  j["max_position_embeddings"] = max_seq_len;
  if (c.sliding_window > 0) {
    j["sliding_window"] = c.sliding_window;
  } else {
    j["sliding_window"] = nullptr;
  }
  j["tie_word_embeddings"] = c.tie_embeddings;
  j["router_aux_loss_coef"] = hf_aux_coef(c);
  j["router_jitter_noise"] = 0.0;
  j["output_router_logits"] = false;
  j["attention_dropout"] = 0.0;
  j["initializer_range"] = json_float(c.init_std);
  j["bos_token_id"] = 256;
  j["eos_token_id"] = 257;
  j["pad_token_id"] = 258;
  j["use_cache"] = true;
  j["torch_dtype"] = torch_dtype;
  return j;
}

namespace {

const nlohmann::json& need(const nlohmann::json& j, const std::string& key, const std::string& where) {
  MOE_CHECK(j.contains(key) && !j[key].is_null(), "{}: config.json has no '{}'", where, key);
  return j[key];
}

int64_t need_int(const nlohmann::json& j, const std::string& key, const std::string& where) {
  const nlohmann::json& v = need(j, key, where);
  MOE_CHECK(v.is_number_integer() && v.get<int64_t>() > 0, "{}: config.json '{}' must be a positive integer, got {}",
            where, key, v.dump());
  return v.get<int64_t>();
}

float need_float(const nlohmann::json& v, const std::string& key, const std::string& where) {
  MOE_CHECK(v.is_number(), "{}: config.json '{}' must be a number, got {}", where, key, v.dump());
  return static_cast<float>(v.get<double>());
}

}  // namespace

HfModel model_from_mixtral_config(const nlohmann::json& j, const std::string& where) {
  MOE_CHECK(j.is_object(), "{}: config.json must be a JSON object", where);
  const bool mixtral = j.value("model_type", "") == "mixtral" ||
                       (j.contains("architectures") && j["architectures"].is_array() && !j["architectures"].empty() &&
                        j["architectures"][0] == "MixtralForCausalLM");
  MOE_CHECK(mixtral, "{}: config.json describes model_type '{}', moeforge imports Mixtral-layout models (mixtral)",
            where, j.value("model_type", std::string("?")));
  HfModel out;
  ModelConfig& m = out.model;
  m.vocab_size = need_int(j, "vocab_size", where);
  m.dim = need_int(j, "hidden_size", where);
  m.expert_hidden = need_int(j, "intermediate_size", where);
  m.n_layers = static_cast<int>(need_int(j, "num_hidden_layers", where));
  m.n_heads = static_cast<int>(need_int(j, "num_attention_heads", where));
  m.n_kv_heads = j.contains("num_key_value_heads") && !j["num_key_value_heads"].is_null()
                     ? static_cast<int>(need_int(j, "num_key_value_heads", where))
                     : m.n_heads;
  m.head_dim = j.contains("head_dim") && !j["head_dim"].is_null() ? need_int(j, "head_dim", where) : m.dim / m.n_heads;
  const std::string experts_key = j.contains("num_local_experts") ? "num_local_experts" : "num_experts";
  m.n_experts = static_cast<int>(need_int(j, experts_key, where));
  m.top_k = static_cast<int>(need_int(j, "num_experts_per_tok", where));
  m.norm_eps = need_float(need(j, "rms_norm_eps", where), "rms_norm_eps", where);
  if (j.contains("rope_theta")) {
    m.rope_theta = need_float(j["rope_theta"], "rope_theta", where);
  } else if (j.contains("rope_parameters") && j["rope_parameters"].is_object()) {
    const nlohmann::json& r = j["rope_parameters"];
    MOE_CHECK(r.value("rope_type", "default") == "default",
              "{}: config.json rope_parameters.rope_type '{}' is not supported (plain RoPE only)", where,
              r.value("rope_type", ""));
    m.rope_theta = need_float(need(r, "rope_theta", where), "rope_parameters.rope_theta", where);
  } else {
    m.rope_theta = 1e6f;  // MixtralConfig's default
  }
  MOE_CHECK(!j.contains("rope_scaling") || j["rope_scaling"].is_null(),
            "{}: config.json sets rope_scaling, which moeforge does not implement", where);
  if (j.contains("sliding_window") && !j["sliding_window"].is_null())
    m.sliding_window = need_int(j, "sliding_window", where);  // null: no window
  MOE_CHECK(j.value("hidden_act", std::string("silu")) == "silu",
            "{}: config.json hidden_act '{}': moeforge experts are SwiGLU (silu)", where, j.value("hidden_act", ""));
  m.tie_embeddings = j.value("tie_word_embeddings", false);
  m.gating = ops::Gating::kSoftmaxTopK;
  const double aux = j.contains("router_aux_loss_coef") ? j["router_aux_loss_coef"].get<double>() : 0.001;
  m.aux_loss_coef = static_cast<float>(aux * m.top_k / m.n_layers);
  m.z_loss_coef = 0.0f;  // Mixtral trains without a router z-loss
  if (j.contains("initializer_range")) m.init_std = need_float(j["initializer_range"], "initializer_range", where);
  out.max_seq_len = j.contains("max_position_embeddings") ? need_int(j, "max_position_embeddings", where) : 131072;
  try {
    m.validate();
  } catch (const Error& e) {
    MOE_THROW("{}: config.json: {}", where, e.what());
  }
  return out;
}

std::vector<float> permute_qk_rows(const std::vector<float>& w, int64_t n_heads, int64_t head_dim, int64_t cols) {
  MOE_CHECK(static_cast<int64_t>(w.size()) == n_heads * head_dim * cols && head_dim % 2 == 0,
            "permute_qk_rows: {} values are not ({} heads x {} rows, {}) with an even head dim", w.size(), n_heads,
            head_dim, cols);
  std::vector<float> out(w.size());
  const int64_t half = head_dim / 2;
  for (int64_t h = 0; h < n_heads; ++h)
    for (int64_t j = 0; j < half; ++j)
      for (int64_t t = 0; t < 2; ++t) {
        const float* src = w.data() + (h * head_dim + t * half + j) * cols;
        std::copy_n(src, cols, out.data() + (h * head_dim + 2 * j + t) * cols);
      }
  return out;
}

}  // namespace moeforge::checkpoint
