#include "launch/release.h"

#include <filesystem>
#include <fstream>

#include <fmt/format.h>

#include "checkpoint/files.h"
#include "checkpoint/hf_export.h"
#include "checkpoint/hf_import.h"
#include "checkpoint/load.h"
#include "data/byte_tokenizer.h"
#include "launch/config.h"
#include "models/transformer.h"
#include "parallel/mpi_runtime.h"

#ifndef MOEFORGE_SOURCE_REVISION
#define MOEFORGE_SOURCE_REVISION "unknown"
#endif
#ifndef MOEFORGE_VERSION
#define MOEFORGE_VERSION "0.1.0"
#endif

namespace moeforge {

namespace fs = std::filesystem;

const char* source_revision() { return MOEFORGE_SOURCE_REVISION; }

namespace {

std::string read_text(const fs::path& path) {
  std::ifstream is(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(is), std::istreambuf_iterator<char>()};
}

// The last line of a JSONL file, or "".
std::string last_line(const fs::path& path) {
  std::ifstream is(path);
  std::string line, last;
  while (std::getline(is, line))
    if (!line.empty()) last = line;
  return last;
}

checkpoint::ReleaseInfo release_info(const std::string& step_dir, const ExportCommand& c) {
  const checkpoint::Manifest m = checkpoint::read_manifest(step_dir);
  const config::RunConfig& run = m.config();
  checkpoint::ReleaseInfo r;
  r.model = model_config_from(run);
  r.max_seq_len = run.model().max_seq_len();
  r.name = !c.name.empty() ? c.name : fs::path(step_dir).parent_path().filename().string();
  if (r.name.empty()) r.name = "moeforge-model";
  r.license = c.license;
  if (!r.license.empty()) checkpoint::check_spdx(r.license);
  r.moeforge_version = MOEFORGE_VERSION;
  r.source_revision = source_revision();
  r.run_config = to_text(run);
  r.checkpoint = step_dir;
  r.steps = m.step();
  r.tokens = static_cast<int64_t>(m.data_position()) * run.train().seq_len();
  const auto& l = m.layout();
  r.layout = fmt::format("{} rank(s): tp {} x pp {} x dp {}, ep {}{}", l.world_size(), l.tp(), l.pp(), l.dp(), l.ep(),
                         l.zero_stage() ? ", ZeRO-1" : "");
  // `moeforge data prepare` writes manifest.json next to the train/ and val/ directories.
  if (!run.data().train().empty()) {
    const fs::path manifest = fs::path(run.data().train()).parent_path() / "manifest.json";
    if (fs::exists(manifest)) r.data_manifest = read_text(manifest);
    while (!r.data_manifest.empty() && r.data_manifest.back() == '\n') r.data_manifest.pop_back();
  }
  if (!run.logging().dir().empty()) r.final_metrics = last_line(fs::path(run.logging().dir()) / "metrics.jsonl");
  return r;
}

}  // namespace

int run_export(const ExportCommand& c) {
  const std::string step_dir = checkpoint::resolve_checkpoint(c.checkpoint);
  const checkpoint::ReleaseInfo info = release_info(step_dir, c);
  if (c.format == "hf") {
    const int64_t max_shard = checkpoint::parse_size(c.max_shard_size);
    const std::vector<std::string> files =
        checkpoint::export_hf(step_dir, info, {.out_dir = c.out, .dtype = c.dtype, .max_shard_bytes = max_shard});
    fmt::print("exported {} (step {}) as a Hugging Face MixtralForCausalLM folder, {}: {} ({} files)\n", step_dir,
               info.steps, c.dtype, c.out, files.size());
    return 0;
  }
  MOE_CHECK(c.format == "gguf", "--format: expected hf or gguf, got '{}'", c.format);
  const checkpoint::GgmlType type = checkpoint::parse_ggml_type(c.type);
  const std::vector<std::string> fallback = checkpoint::export_gguf(step_dir, info, {.out_path = c.out, .type = type});
  fmt::print("exported {} (step {}) as GGUF (llama, {}): {}\n", step_dir, info.steps, c.type, c.out);
  if (!fallback.empty())
    fmt::print("note: {} tensor(s) whose rows are not whole {} blocks were written as f16\n", fallback.size(), c.type);
  return 0;
}

int run_import(const std::string& hf_dir, const std::string& out) {
  // The checkpoint records a run configuration: the schema's defaults, with the imported model.
  const config::RunConfig base;
  const checkpoint::ImportResult r = checkpoint::import_hf(hf_dir, out, base);
  const ModelConfig& m = r.model.model;
  fmt::print("imported {} ({} tensors, {} parameters: {} layers, width {}, {} experts top-{}) into {}; continue "
             "training with: moeforge train --config CONFIG --resume {}\n",
             hf_dir, r.tensors, r.parameters, m.n_layers, m.dim, m.n_experts, m.top_k, r.step_dir, out);
  return 0;
}

int run_generate(const GenerateCommand& c) {
  MpiRuntime mpi;
  if (mpi.world_rank() == 0) {
    const std::string step_dir = checkpoint::resolve_checkpoint(c.checkpoint);
    const checkpoint::Manifest m = checkpoint::read_manifest(step_dir);
    const ModelConfig cfg = model_config_from(m.config());
    MoeTransformer model(cfg);
    checkpoint::load(step_dir, model.registry(), nullptr);
    SampleOptions o = c.sample;
    if (o.context <= 0) o.context = m.config().model().max_seq_len();
    InferenceModel inference(cfg, model.registry(), o.context);
    std::vector<int32_t> ids;
    if (c.bos) ids.push_back(data::kBos);
    const std::vector<int32_t> text = data::encode(c.prompt);
    ids.insert(ids.end(), text.begin(), text.end());
    MOE_CHECK(!ids.empty(), "--prompt: empty prompt (and --no-bos)");
    o.stop_token = data::kEos;
    const std::vector<int32_t> out = generate(inference, ids, o);
    fmt::print("{}{}\n", c.prompt, data::decode(out));
    std::fflush(stdout);
  }
  // The other ranks only wait; the world barrier is a tiny all-reduce with no deadline to speak of.
  if (mpi.world_size() > 1) {
    const ProcessGrid grid = ProcessGrid::create(mpi, {.tp = 1, .pp = 1, .dp = mpi.world_size(), .ep = 1}, 86400.0);
    grid.world().all_reduce(Tensor::zeros({1}, DType::kF32));
  }
  return 0;
}

}  // namespace moeforge
