#include "checkpoint/hf_export.h"

#include <filesystem>
#include <fstream>
#include <map>
#include <set>

#include <fmt/format.h>

#include "checkpoint/byte_vocab.h"
#include "checkpoint/files.h"
#include "checkpoint/mixtral_layout.h"
#include "checkpoint/safetensors.h"
#include "checkpoint/tensor_reader.h"
#include "data/sha256.h"

namespace moeforge::checkpoint {

namespace fs = std::filesystem;

int64_t parse_size(const std::string& text) {
  size_t end = 0;
  double v = 0.0;
  try {
    v = std::stod(text, &end);
  } catch (const std::exception&) {
    MOE_THROW("'{}' is not a size (expected e.g. 5GB, 500MB, 2GiB or a byte count)", text);
  }
  static const std::map<std::string, double> units = {{"", 1},      {"B", 1},       {"KB", 1e3}, {"MB", 1e6},
                                                      {"GB", 1e9}, {"TB", 1e12},   {"KiB", 1024.0},
                                                      {"MiB", 1048576.0}, {"GiB", 1073741824.0}};
  const auto it = units.find(text.substr(end));
  MOE_CHECK(it != units.end() && v > 0, "'{}' is not a size (expected e.g. 5GB, 500MB, 2GiB or a byte count)", text);
  return static_cast<int64_t>(v * it->second);
}

namespace {

void write_text(const fs::path& path, const std::string& text) {
  write_file_atomic(path.string(), text);
}

std::string dump(const nlohmann::ordered_json& j) { return j.dump(2) + "\n"; }

// Prepares the output folder: created when missing; an earlier export in it (listed by its
// SHA256SUMS) is removed; anything else there is refused rather than mixed with the new files.
void prepare_out_dir(const fs::path& dir) {
  fs::create_directories(dir);
  if (fs::is_empty(dir)) return;
  const fs::path sums = dir / "SHA256SUMS";
  MOE_CHECK(fs::exists(sums), "{}: the output folder is not empty and holds no earlier export (no SHA256SUMS); "
            "choose an empty or new folder", dir.string());
  std::ifstream is(sums);
  std::string line;
  while (std::getline(is, line))
    if (line.size() > 66) fs::remove(dir / line.substr(66));
  fs::remove(sums);
  MOE_CHECK(fs::is_empty(dir), "{}: the output folder holds files its SHA256SUMS does not list; choose an empty folder",
            dir.string());
}

void write_sums(const fs::path& dir, const std::vector<std::string>& files) {
  std::vector<std::string> sorted = files;
  std::sort(sorted.begin(), sorted.end());
  std::string text;
  for (const std::string& f : sorted) text += fmt::format("{}  {}\n", data::sha256_file((dir / f).string()), f);
  write_text(dir / "SHA256SUMS", text);
}

void check_shapes(CheckpointReader& reader, const std::vector<HfTensor>& tensors) {
  std::map<std::string, std::vector<int64_t>> want;
  for (const HfTensor& t : tensors) {
    std::vector<int64_t> s = t.shape;
    if (t.expert >= 0) s.insert(s.begin(), 0);
    want[t.param] = s;
  }
  for (auto& [param, shape] : want) {
    const std::vector<int64_t> have = reader.shape(param);
    if (shape.size() == 3) shape[0] = have.empty() ? 0 : have[0];
    MOE_CHECK(have == shape, "checkpoint {}: {} has shape {}, the model config says {}", reader.dir(), param,
              box_shape_str(have), box_shape_str(shape));
  }
}

// The values of one HF tensor: the whole parameter, or one expert's row of it.
std::vector<float> read_hf(CheckpointReader& reader, const HfTensor& t) {
  if (t.expert < 0) return reader.read(t.param);
  Box box{{t.expert, 0, 0}, {1, t.shape[0], t.shape[1]}};
  return reader.read(t.param, box);
}

}  // namespace

std::vector<std::string> export_hf(const std::string& step_dir, const ReleaseInfo& info, const HfExportOptions& o) {
  const ModelConfig& cfg = info.model;
  check_mixtral_expressible(cfg, "HF Mixtral");
  static const std::map<std::string, std::pair<std::string, std::string>> dtypes = {
      {"f32", {"F32", "float32"}}, {"f16", {"F16", "float16"}}, {"bf16", {"BF16", "bfloat16"}}};
  const auto dt = dtypes.find(o.dtype);
  MOE_CHECK(dt != dtypes.end(), "--dtype: expected bf16, f16 or f32, got '{}'", o.dtype);
  MOE_CHECK(o.max_shard_bytes > 0, "--max-shard-size must be positive");
  const std::string& st_dtype = dt->second.first;
  const int64_t elem = safetensors_dtype_bits(st_dtype) / 8;
  const std::vector<std::string> vocab = byte_vocab_tokens(cfg.vocab_size);  // checks the vocabulary early

  CheckpointReader reader(step_dir);
  const std::vector<HfTensor> tensors = mixtral_tensors(cfg);
  check_shapes(reader, tensors);

  // Shards: tensors in model order, a new shard when the next tensor would pass the limit.
  std::vector<std::vector<const HfTensor*>> shards(1);
  int64_t in_shard = 0, total = 0;
  for (const HfTensor& t : tensors) {
    int64_t bytes = elem;
    for (const int64_t d : t.shape) bytes *= d;
    if (in_shard > 0 && in_shard + bytes > o.max_shard_bytes) {
      shards.emplace_back();
      in_shard = 0;
    }
    shards.back().push_back(&t);
    in_shard += bytes;
    total += bytes;
  }

  // Everything is written into a sibling staging folder first and moved in at the end, so a failed
  // export leaves the output folder as it was.
  const fs::path out(o.out_dir), dir = out.string() + ".partial";
  fs::remove_all(dir);
  fs::create_directories(dir);
  std::vector<std::string> written, weight_files;
  nlohmann::ordered_json weight_map = nlohmann::ordered_json::object();
  for (size_t s = 0; s < shards.size(); ++s) {
    const std::string name = shards.size() == 1
                                 ? std::string("model.safetensors")
                                 : fmt::format("model-{:05}-of-{:05}.safetensors", s + 1, shards.size());
    std::vector<SafetensorsTensor> decl;
    std::map<std::string, const HfTensor*> by_name;
    for (const HfTensor* t : shards[s]) {
      decl.push_back({.name = t->hf_name, .dtype = st_dtype, .shape = t->shape});
      by_name[t->hf_name] = t;
    }
    SafetensorsWriter writer((dir / name).string(), decl, {{"format", "pt"}});
    for (const SafetensorsTensor& t : writer.layout())
      writer.write(t.name, encode_floats(read_hf(reader, *by_name.at(t.name)), st_dtype));
    writer.close();
    for (const SafetensorsTensor& t : writer.layout()) weight_map[t.name] = name;
    written.push_back(name);
    weight_files.push_back(name);
  }
  if (shards.size() > 1) {
    std::map<std::string, std::string> sorted;
    for (const auto& [k, v] : weight_map.items()) sorted[k] = v.get<std::string>();
    nlohmann::ordered_json sorted_map = nlohmann::ordered_json::object();
    for (const auto& [k, v] : sorted) sorted_map[k] = v;
    nlohmann::ordered_json index;
    index["metadata"] = {{"total_size", total}};
    index["weight_map"] = sorted_map;
    write_text(dir / "model.safetensors.index.json", dump(index));
    written.push_back("model.safetensors.index.json");
  }

  write_text(dir / "config.json", dump(mixtral_config_json(cfg, info.max_seq_len, dt->second.second)));
  nlohmann::ordered_json gen;
  gen["bos_token_id"] = 256;
  gen["eos_token_id"] = 257;
  gen["pad_token_id"] = 258;
  write_text(dir / "generation_config.json", dump(gen));
  write_text(dir / "tokenizer.json", dump(tokenizer_json(cfg.vocab_size)));
  write_text(dir / "tokenizer_config.json", dump(tokenizer_config_json(info.max_seq_len)));
  write_text(dir / "special_tokens_map.json", dump(special_tokens_map_json()));
  write_text(dir / "README.md", model_card(info, o.dtype, weight_files));
  for (const char* f : {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                        "special_tokens_map.json", "README.md"})
    written.push_back(f);
  write_sums(dir, written);
  written.push_back("SHA256SUMS");
  prepare_out_dir(out);
  for (const std::string& f : written) fs::rename(dir / f, out / f);
  fs::remove_all(dir);
  fsync_path(out.string());
  return written;
}

}  // namespace moeforge::checkpoint
