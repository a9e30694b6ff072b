#include "checkpoint/hf_import.h"

#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <set>

#include <fmt/format.h>

#include "checkpoint/files.h"
#include "checkpoint/hdf5_io.h"
#include "checkpoint/safetensors.h"
#include "checkpoint/save.h"

namespace moeforge::checkpoint {

namespace fs = std::filesystem;

namespace {

nlohmann::json read_json(const fs::path& path) {
  std::ifstream is(path);
  MOE_CHECK(is.good(), "{}: cannot read", path.string());
  try {
    return nlohmann::json::parse(is);
  } catch (const nlohmann::json::exception& e) {
    MOE_THROW("{}: not valid JSON: {}", path.string(), e.what());
  }
}

// HF tensor name -> (validated file, its entry), over every shard of the folder.
struct HfFiles {
  std::vector<std::unique_ptr<SafetensorsReader>> readers;
  std::map<std::string, std::pair<const SafetensorsReader*, const SafetensorsTensor*>> tensors;
};

HfFiles open_weights(const fs::path& dir) {
  HfFiles out;
  const fs::path index = dir / "model.safetensors.index.json";
  std::map<std::string, std::string> weight_map;
  std::set<std::string> files;
  if (fs::exists(index)) {
    const nlohmann::json j = read_json(index);
    MOE_CHECK(j.is_object() && j.contains("weight_map") && j["weight_map"].is_object(),
              "{}: expected an object with a weight_map", index.string());
    for (const auto& [name, file] : j["weight_map"].items()) {
      MOE_CHECK(file.is_string(), "{}: weight_map[{}] must be a file name", index.string(), name);
      const std::string f = file.get<std::string>();
      MOE_CHECK(!f.empty() && f.find('/') == std::string::npos && f != "." && f != "..",
                "{}: weight_map[{}] = '{}' is not a file name in the folder", index.string(), name, f);
      weight_map[name] = f;
      files.insert(f);
    }
  } else {
    MOE_CHECK(fs::exists(dir / "model.safetensors"),
              "{}: no model.safetensors.index.json and no model.safetensors (expected a Hugging Face model folder)",
              dir.string());
    files.insert("model.safetensors");
  }
  for (const std::string& f : files) {
    out.readers.push_back(std::make_unique<SafetensorsReader>((dir / f).string()));
    const SafetensorsReader& r = *out.readers.back();
    for (const SafetensorsTensor& t : r.tensors()) {
      MOE_CHECK(!out.tensors.count(t.name), "{}: tensor {} is in two shards ({} and {})", dir.string(), t.name,
                out.tensors[t.name].first->path(), r.path());
      if (!weight_map.empty())
        MOE_CHECK(weight_map.count(t.name) && weight_map[t.name] == f,
                  "{}: holds tensor {}, which the index maps to {}", r.path(), t.name,
                  weight_map.count(t.name) ? weight_map[t.name] : std::string("no file"));
      out.tensors[t.name] = {&r, &t};
    }
  }
  for (const auto& [name, f] : weight_map)
    MOE_CHECK(out.tensors.count(name), "{}: the index maps {} to {}, which does not hold it", index.string(), name, f);
  return out;
}

void write_param(H5File& file, Manifest& m, const std::string& shard, const std::string& name, TensorKind kind,
                 const std::vector<int64_t>& shape, const float* data) {
  static const char* kinds[] = {"param", "exp_avg", "exp_avg_sq"};
  const std::string dataset = fmt::format("{}/{}", kinds[kind], name);
  const std::vector<int64_t> zero(shape.size(), 0);
  file.write(dataset, data, shape, BlockAttrs{name, kinds[kind], shape, zero});
  TensorEntry* t = m.add_tensors();
  t->set_name(name);
  t->set_kind(kind);
  t->set_dtype("f32");
  for (const int64_t s : shape) t->add_shape(s);
  Piece* p = t->add_pieces();
  p->set_file(shard);
  p->set_dataset(dataset);
  for (const int64_t s : shape) {
    p->add_offset(0);
    p->add_shape(s);
  }
}

void set_model(config::RunConfig& run, const HfModel& h) {
  const ModelConfig& m = h.model;
  config::ModelConfig* p = run.mutable_model();
  p->set_vocab_size(m.vocab_size);
  p->set_dim(m.dim);
  p->set_n_layers(m.n_layers);
  p->set_n_heads(m.n_heads);
  p->set_n_kv_heads(m.n_kv_heads);
  p->set_head_dim(m.head_dim);
  p->set_n_experts(m.n_experts);
  p->set_top_k(m.top_k);
  p->set_expert_hidden(m.expert_hidden);
  p->set_n_shared_experts(0);
  p->set_gating(config::ModelConfig::SOFTMAX_TOPK);
  p->set_rope_theta(m.rope_theta);
  p->set_norm_eps(m.norm_eps);
  p->set_tie_embeddings(m.tie_embeddings);
  p->set_aux_loss_coef(m.aux_loss_coef);
  p->set_z_loss_coef(m.z_loss_coef);
  p->set_init_std(m.init_std);
  p->set_max_seq_len(h.max_seq_len);
  p->set_expert_bias_update_rate(0.0f);
  p->set_sliding_window(m.sliding_window);  // config.json's sliding_window (0: null)
}

}  // namespace

ImportResult import_hf(const std::string& hf_dir, const std::string& out_dir, config::RunConfig base) {
  const fs::path dir(hf_dir);
  MOE_CHECK(fs::is_directory(dir), "{}: not a directory (expected a Hugging Face model folder)", hf_dir);
  ImportResult result;
  result.model = model_from_mixtral_config(read_json(dir / "config.json"), (dir / "config.json").string());
  const ModelConfig& cfg = result.model.model;
  const HfFiles files = open_weights(dir);

  // Parameters in model order, each with its HF tensors (one, or one per expert).
  const std::vector<HfTensor> tensors = mixtral_tensors(cfg);
  std::set<std::string> expected;
  for (const HfTensor& t : tensors) expected.insert(t.hf_name);
  for (const auto& [name, where] : files.tensors) {
    if (name.ends_with(".rotary_emb.inv_freq")) continue;  // a non-persistent buffer older exports kept
    MOE_CHECK(expected.count(name), "{}: tensor {} is not part of a Mixtral model with this config.json", 
              where.first->path(), name);
  }
  for (const HfTensor& t : tensors) {
    const auto it = files.tensors.find(t.hf_name);
    MOE_CHECK(it != files.tensors.end(), "{}: tensor {} is missing", hf_dir, t.hf_name);
    MOE_CHECK(it->second.second->shape == t.shape, "{}: tensor {} has shape {}, config.json implies {}",
              it->second.first->path(), t.hf_name, box_shape_str(it->second.second->shape), box_shape_str(t.shape));
  }

  fs::create_directories(out_dir);
  const std::string step = step_dir_name(0);
  const fs::path tmp = fs::path(out_dir) / (".tmp_" + step), final_dir = fs::path(out_dir) / step;
  MOE_CHECK(!fs::exists(final_dir), "{}: already holds {}; import into a new checkpoint directory", out_dir, step);
  fs::remove_all(tmp);
  fs::create_directories(tmp);
  const std::string shard = "rank_00000.h5";
  Manifest m;
  set_model(base, result.model);
  {
    H5File file = H5File::create((tmp / shard).string());
    // Parameters in model order, each from its HF tensors (one, or one per expert in order).
    std::vector<std::string> order;
    std::map<std::string, std::vector<const HfTensor*>> parts;
    for (const HfTensor& t : tensors) {
      if (!parts.count(t.param)) order.push_back(t.param);
      parts[t.param].push_back(&t);
    }
    for (const std::string& name : order) {
      const std::vector<const HfTensor*>& ts = parts[name];
      std::vector<int64_t> shape = ts.front()->shape;
      if (ts.front()->expert >= 0) shape.insert(shape.begin(), static_cast<int64_t>(ts.size()));
      std::vector<float> values;
      for (const HfTensor* t : ts) {  // experts come in index order
        const auto& [reader, entry] = files.tensors.at(t->hf_name);
        const std::vector<float> v = reader->read_floats(*entry);
        values.insert(values.end(), v.begin(), v.end());
        ++result.tensors;
      }
      write_param(file, m, shard, name, PARAM, shape, values.data());
      std::fill(values.begin(), values.end(), 0.0f);  // fresh AdamW moments
      write_param(file, m, shard, name, EXP_AVG, shape, values.data());
      write_param(file, m, shard, name, EXP_AVG_SQ, shape, values.data());
      result.parameters += static_cast<int64_t>(values.size());
    }
    file.close();
  }
  fsync_path((tmp / shard).string());
  const FileDigest d = digest_file((tmp / shard).string());
  File* f = m.add_files();
  f->set_name(shard);
  f->set_size(d.size);
  f->set_sha256(d.sha256);
  m.set_format_version(kFormatVersion);
  m.set_step(0);
  *m.mutable_config() = base;
  Layout* l = m.mutable_layout();
  l->set_world_size(1);
  l->set_tp(1);
  l->set_pp(1);
  l->set_dp(1);
  l->set_ep(1);
  m.set_data_position(0);
  m.set_optimizer_steps(0);
  m.set_rng_seed(base.train().seed());
  write_file_atomic((tmp / kManifestName).string(), m.SerializeAsString());
  fsync_path(tmp.string());
  fs::rename(tmp, final_dir);
  fsync_path(out_dir);
  write_file_atomic((fs::path(out_dir) / kLatestName).string(), step + "\n");
  result.step_dir = final_dir.string();
  return result;
}

}  // namespace moeforge::checkpoint
