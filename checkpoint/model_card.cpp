#include "checkpoint/model_card.h"

#include <set>

#include <fmt/format.h>

#include "runtime/error.h"
#include "runtime/ops.h"

namespace moeforge::checkpoint {

bool osi_approved(const std::string& spdx) {
  // A subset of https://opensource.org/licenses (the ids people release models under); anything
  // else is reported as "not in moeforge's list", not as "not approved".
  static const std::set<std::string> ids = {
      "0BSD",          "AFL-3.0",          "AGPL-3.0-only",    "AGPL-3.0-or-later", "Apache-2.0",
      "Artistic-2.0",  "BSD-2-Clause",     "BSD-3-Clause",     "BSL-1.0",           "CDDL-1.0",
      "ECL-2.0",       "EPL-1.0",          "EPL-2.0",          "EUPL-1.2",          "GPL-2.0-only",
      "GPL-2.0-or-later", "GPL-3.0-only",  "GPL-3.0-or-later", "ISC",               "LGPL-2.1-only",
      "LGPL-2.1-or-later", "LGPL-3.0-only", "LGPL-3.0-or-later", "MIT",             "MIT-0",
      "MPL-2.0",       "MS-PL",            "NCSA",             "OSL-3.0",           "PostgreSQL",
      "UPL-1.0",       "Unlicense",        "Zlib"};
  return ids.count(spdx) > 0;
}

void check_spdx(const std::string& spdx) {
  MOE_CHECK(!spdx.empty() && spdx.size() < 200, "--license: expected an SPDX license id such as Apache-2.0, got '{}'",
            spdx);
  for (const char ch : spdx)
    MOE_CHECK(std::isalnum(static_cast<unsigned char>(ch)) || std::string_view(".-+ ()").find(ch) != std::string::npos,
              "--license: '{}' is not an SPDX license id (character '{}')", spdx, ch);
}

std::string model_card(const ReleaseInfo& r, const std::string& dtype, const std::vector<std::string>& weight_files) {
  const ModelConfig& m = r.model;
  std::string files;
  for (const std::string& f : weight_files) files += fmt::format("- `{}`\n", f);
  const std::string license =
      r.license.empty() ? "not stated (exported without --license): treat the weights as all rights reserved"
                        : fmt::format("`{}` ({})", r.license,
                                      osi_approved(r.license) ? "an OSI-approved open-source license"
                                                              : "not in moeforge's list of OSI-approved licenses");
  return fmt::format(
      "---\n"
      "license: {}\n"
      "library_name: transformers\n"
      "tags:\n- moeforge\n- mixtral\n- mixture-of-experts\n"
      "---\n\n"
      "# {}\n\n"
      "A Mixture-of-Experts language model pretrained with moeforge and exported in the Hugging Face "
      "Mixtral layout (`MixtralForCausalLM`). Load it with `transformers` (`AutoModelForCausalLM.from_pretrained`) "
      "and its byte-level tokenizer with `AutoTokenizer` / `tokenizers`. `SHA256SUMS` lists every file's digest.\n\n"
      "## Weights\n\n"
      "Format: safetensors (`__metadata__` format `pt`), dtype `{}`; routers and norms are stored like every other "
      "tensor. Files:\n\n{}\n"
      "## Architecture and code\n\n"
      "- {} layers, width {}, {} query heads and {} key/value heads of dim {}, RoPE theta {}, RMSNorm eps {}\n"
      "- {} experts per layer of hidden width {}, top-{} softmax routing renormalised over the chosen experts "
      "(Mixtral's router), SwiGLU experts\n"
      "- vocabulary {} (byte-level: ids 0-255 are the bytes, 256 `<bos>`, 257 `<eos>`, 258 `<pad>`), context {}, "
      "tied embeddings: {}\n"
      "- trained by moeforge {} (source revision `{}`), aux-loss coefficient {} per layer (config.json's "
      "`router_aux_loss_coef` is converted to transformers' normalisation)\n\n"
      "Training configuration (moeforge protobuf text):\n\n```\n{}```\n\n"
      "## Training data\n\n{}\n\n"
      "## License\n\n{}\n\n"
      "## Provenance\n\n"
      "- exported from checkpoint `{}` after {} optimizer steps ({} training tokens)\n"
      "- parallel layout of the run: {}\n"
      "- last logged metrics: {}\n",
      r.license.empty() ? "other" : r.license, r.name, dtype, files, m.n_layers, m.dim, m.n_heads, m.n_kv_heads,
      m.head_dim, m.rope_theta, m.norm_eps, m.n_experts, m.expert_hidden, m.top_k, m.vocab_size, r.max_seq_len,
      m.tie_embeddings ? "yes" : "no", r.moeforge_version, r.source_revision, m.aux_loss_coef, r.run_config,
      r.data_manifest.empty()
          ? std::string("The training data manifest was not found next to the run's data directories.")
          : "The data manifest written by `moeforge data prepare` (source files with sizes and SHA-256, tokens per "
            "split, every token shard with its SHA-256):\n\n```json\n" + r.data_manifest + "\n```",
      license, r.checkpoint, r.steps, r.tokens, r.layout,
      r.final_metrics.empty() ? std::string("not found") : "`" + r.final_metrics + "`");
}

}  // namespace moeforge::checkpoint
