// export_gguf (declared in checkpoint/hf_export.h): the GGUF half of the open-weight export.
#include <fmt/format.h>

#include "checkpoint/byte_vocab.h"
#include "checkpoint/hf_export.h"
#include "checkpoint/mixtral_layout.h"
#include "checkpoint/tensor_reader.h"
#include "data/byte_tokenizer.h"

namespace moeforge::checkpoint {

namespace {

// One GGUF tensor: the moeforge parameter it comes from, its ne (fastest dim first) and whether
// it is kept in f32 (norms and routers, as llama.cpp's converter does) and q/k-permuted.
struct GgufTensor {
  std::string name, param;
  std::vector<int64_t> ne;
  bool f32 = false;
  int64_t permute_heads = 0;  // > 0: permute rows with this many heads
};

std::vector<GgufTensor> gguf_tensors(const ModelConfig& c) {
  const int64_t C = c.dim, F = c.expert_hidden, E = c.n_experts, V = c.vocab_size;
  const int64_t HD = c.n_heads * c.head_dim, KD = c.n_kv_heads * c.head_dim;
  std::vector<GgufTensor> out;
  out.push_back({"token_embd.weight", "embed.weight", {C, V}});
  for (int i = 0; i < c.n_layers; ++i) {
    const std::string b = fmt::format("blk.{}.", i), m = fmt::format("layers.{}.", i);
    out.push_back({b + "attn_norm.weight", m + "attn_norm.weight", {C}, true});
    out.push_back({b + "attn_q.weight", m + "attn.wq", {C, HD}, false, c.n_heads});
    out.push_back({b + "attn_k.weight", m + "attn.wk", {C, KD}, false, c.n_kv_heads});
    out.push_back({b + "attn_v.weight", m + "attn.wv", {C, KD}});
    out.push_back({b + "attn_output.weight", m + "attn.wo", {HD, C}});
    out.push_back({b + "ffn_norm.weight", m + "moe_norm.weight", {C}, true});
    out.push_back({b + "ffn_gate_inp.weight", m + "moe.router", {C, E}, true});
    // Our (E, F, C) expert stacks are llama.cpp's [H, F, E] tensors as they are.
    out.push_back({b + "ffn_gate_exps.weight", m + "moe.experts.w1", {C, F, E}});
    out.push_back({b + "ffn_down_exps.weight", m + "moe.experts.w2", {F, C, E}});
    out.push_back({b + "ffn_up_exps.weight", m + "moe.experts.w3", {C, F, E}});
  }
  out.push_back({"output_norm.weight", "final_norm.weight", {C}, true});
  if (!c.tie_embeddings) out.push_back({"output.weight", "lm_head.weight", {C, V}});
  return out;
}

uint32_t file_type(GgmlType t) {
  switch (t) {
    case GgmlType::kF32: return 0;
    case GgmlType::kF16: return 1;
    case GgmlType::kQ4_0: return 2;
    case GgmlType::kQ8_0: return 7;
    case GgmlType::kBF16: return 32;
  }
  return 0;
}

}  // namespace

std::vector<std::string> export_gguf(const std::string& step_dir, const ReleaseInfo& info, const GgufExportOptions& o) {
  const ModelConfig& c = info.model;
  check_mixtral_expressible(c, "GGUF llama");
  // llama.cpp's llama architecture (Mixtral included) attends to the whole context: a model
  // trained with a window would run with other attention than it was trained with.
  MOE_CHECK(c.sliding_window == 0,
            "cannot export to GGUF llama: the model attends through a sliding window of {} tokens "
            "(model.sliding_window), which llama.cpp's llama architecture does not apply; export to HF "
            "safetensors instead (config.json carries sliding_window)",
            c.sliding_window);
  const std::vector<std::string> tokens = byte_vocab_tokens(c.vocab_size);
  CheckpointReader reader(step_dir);
  const std::vector<GgufTensor> tensors = gguf_tensors(c);
  for (const GgufTensor& t : tensors) {
    std::vector<int64_t> want(t.ne.rbegin(), t.ne.rend());
    MOE_CHECK(reader.shape(t.param) == want, "checkpoint {}: {} has shape {}, the model config says {}", step_dir,
              t.param, box_shape_str(reader.shape(t.param)), box_shape_str(want));
  }

  GgufWriter w(o.out_path);
  w.add_string("general.architecture", "llama");
  w.add_string("general.name", info.name);
  if (!info.license.empty()) w.add_string("general.license", info.license);
  w.add_string("general.source.url", "moeforge " + info.moeforge_version + " (" + info.source_revision + ")");
  w.add_u32("general.file_type", file_type(o.type));
  if (o.type == GgmlType::kQ8_0 || o.type == GgmlType::kQ4_0) w.add_u32("general.quantization_version", 2);
  w.add_u32("llama.context_length", static_cast<uint32_t>(info.max_seq_len));
  w.add_u32("llama.embedding_length", static_cast<uint32_t>(c.dim));
  w.add_u32("llama.block_count", static_cast<uint32_t>(c.n_layers));
  w.add_u32("llama.feed_forward_length", static_cast<uint32_t>(c.expert_hidden));
  w.add_u32("llama.attention.head_count", static_cast<uint32_t>(c.n_heads));
  w.add_u32("llama.attention.head_count_kv", static_cast<uint32_t>(c.n_kv_heads));
  w.add_u32("llama.attention.key_length", static_cast<uint32_t>(c.head_dim));
  w.add_u32("llama.attention.value_length", static_cast<uint32_t>(c.head_dim));
  w.add_f32("llama.attention.layer_norm_rms_epsilon", c.norm_eps);
  w.add_f32("llama.rope.freq_base", c.rope_theta);
  w.add_u32("llama.rope.dimension_count", static_cast<uint32_t>(c.head_dim));
  w.add_u32("llama.expert_count", static_cast<uint32_t>(c.n_experts));
  w.add_u32("llama.expert_used_count", static_cast<uint32_t>(c.top_k));
  w.add_u32("llama.vocab_size", static_cast<uint32_t>(c.vocab_size));
  // Byte-level tokenizer as a gpt2 BPE without merges (shared/formats.md §4.2, option A): bytes
  // are NORMAL tokens (llama.cpp turns only those back into bytes), the specials CONTROL.
  w.add_string("tokenizer.ggml.model", "gpt2");
  w.add_string("tokenizer.ggml.pre", "default");
  w.add_strings("tokenizer.ggml.tokens", tokens);
  std::vector<int32_t> types(tokens.size(), 1);
  for (size_t i = 256; i < types.size(); ++i) types[i] = 3;
  w.add_i32s("tokenizer.ggml.token_type", types);
  w.add_strings("tokenizer.ggml.merges", {});
  w.add_u32("tokenizer.ggml.bos_token_id", data::kBos);
  w.add_u32("tokenizer.ggml.eos_token_id", data::kEos);
  w.add_u32("tokenizer.ggml.padding_token_id", data::kPad);
  w.add_bool("tokenizer.ggml.add_bos_token", true);  // training documents start with <bos>
  w.add_bool("tokenizer.ggml.add_eos_token", false);

  std::vector<std::string> fallback;
  std::vector<GgmlType> types_of;
  for (const GgufTensor& t : tensors) {
    GgmlType type = t.f32 ? GgmlType::kF32 : o.type;
    if (t.ne[0] % ggml_block_size(type) != 0) {
      type = GgmlType::kF16;
      fallback.push_back(t.name);
    }
    types_of.push_back(type);
    w.add_tensor(t.name, t.ne, type);
  }
  w.write_header();
  for (size_t i = 0; i < tensors.size(); ++i) {
    const GgufTensor& t = tensors[i];
    std::vector<float> v = reader.read(t.param);
    if (t.permute_heads > 0) v = permute_qk_rows(v, t.permute_heads, c.head_dim, c.dim);
    w.write_tensor(t.name, ggml_encode(v, types_of[i]));
  }
  w.close();
  return fallback;
}

}  // namespace moeforge::checkpoint
