#include "checkpoint/load.h"

#include <cstring>
#include <filesystem>
#include <future>
#include <map>
#include <optional>

#include <fmt/format.h>

#include "checkpoint/files.h"
#include "checkpoint/hdf5_io.h"
#include "checkpoint/placement.h"

namespace moeforge::checkpoint {

namespace fs = std::filesystem;

namespace {

const char* kind_label(TensorKind k) {
  switch (k) {
    case PARAM: return "parameter";
    case EXP_AVG: return "AdamW exp_avg";
    case EXP_AVG_SQ: return "AdamW exp_avg_sq";
    default: return "tensor";
  }
}

std::vector<int64_t> to_vec(const google::protobuf::RepeatedField<int64_t>& f) { return {f.begin(), f.end()}; }

// The first dataset of an open file whose full read fails (a Fletcher-32 mismatch), with the
// error, or nullopt.
std::optional<std::string> damaged_dataset(const H5File& file) {
  for (const std::string& ds : file.datasets()) {
    try {
      const std::vector<int64_t> shape = file.f32_shape(ds);
      int64_t n = 1;
      for (const int64_t s : shape) n *= s;
      std::vector<float> buf(static_cast<size_t>(n));
      const std::vector<int64_t> zero(shape.size(), 0);
      file.read(ds, zero, shape, buf.data(), shape, zero);
    } catch (const Error& e) {
      return std::string(e.what());
    }
  }
  return std::nullopt;
}

// Shard files opened once each. With verify_sha256, a file's SHA-256 is computed on a thread of
// its own while the hyperslabs are read (it reads the file without HDF5), and checked against
// the manifest by check(): after a failed read of the file (so a damaged chunk is reported as a
// corrupt file, naming the dataset) and for every file at the end of the load. Without it, a
// damaged chunk fails its own read (Fletcher-32), naming file, dataset and chunk.
class ShardFiles {
 public:
  ShardFiles(std::string dir, const Manifest& m, bool verify_sha256) : dir_(std::move(dir)), verify_(verify_sha256) {
    for (const File& f : m.files()) entries_[f.name()] = &f;
  }

  const H5File& get(const std::string& name) {
    const auto open = files_.find(name);
    if (open != files_.end()) return open->second.file;
    const auto entry = entries_.find(name);
    MOE_CHECK(entry != entries_.end(), "checkpoint {}: a piece names file {}, which the manifest does not list", dir_,
              name);
    const std::string path = (fs::path(dir_) / name).string();
    MOE_CHECK(fs::exists(path), "checkpoint {}: shard file {} is missing", dir_, name);
    std::shared_future<FileDigest> digest;
    if (verify_) digest = std::async(std::launch::async, [path] { return digest_file(path); }).share();
    try {
      return files_.emplace(name, Open{H5File::open(path), digest}).first->second.file;
    } catch (const Error&) {
      if (verify_) check_digest(name, digest.get());  // a damaged file is reported as such
      throw;
    }
  }

  // Throws when the file's digest disagrees with the manifest (waits for the digest); nothing
  // without verify_sha256.
  void check(const std::string& name) {
    if (verify_) check_digest(name, files_.at(name).digest.get());
  }
  void check_all() {
    if (!verify_) return;
    for (auto& [name, open] : files_) check_digest(name, open.digest.get());
  }

 private:
  struct Open {
    H5File file;
    std::shared_future<FileDigest> digest;
  };

  void check_digest(const std::string& name, const FileDigest& d) const {
    const File& want = *entries_.at(name);
    if (d.size == want.size() && d.sha256 == want.sha256()) return;
    const std::string path = (fs::path(dir_) / name).string();
    std::string where = "the damage is outside the tensor data (HDF5 metadata)";
    try {
      const H5File file = H5File::open(path);
      if (const auto bad = damaged_dataset(file)) where = *bad;
    } catch (const Error& e) {
      where = e.what();
    }
    MOE_THROW("checkpoint {}: shard file {} is corrupt: size {} / SHA-256 {}, the manifest says {} / {}; {}", dir_,
              name, d.size, d.sha256, want.size(), want.sha256(), where);
  }

  std::string dir_;
  bool verify_ = false;
  std::map<std::string, const File*> entries_;
  std::map<std::string, Open> files_;
};

// Fills `dst` (row-major, of shape dst_box.shape, placed at dst_box.offset of the global tensor)
// on the box `want` from the pieces of `t`; every element of `want` must be covered once.
// With a batch, reads of our own chunk layout are queued there (dst is filled at batch->run()).
void read_box(const std::string& dir, const TensorEntry& t, const Box& want, const Box& dst_box, float* dst,
              ShardFiles& files, ChunkReads* batch = nullptr) {
  int64_t covered = 0;
  for (const Piece& piece : t.pieces()) {
    const Box stored{to_vec(piece.offset()), to_vec(piece.shape())};
    const std::optional<Box> part = intersect(stored, want);
    if (!part) continue;
    const H5File& file = files.get(piece.file());
    const std::vector<int64_t> shape = file.f32_shape(piece.dataset());
    MOE_CHECK(shape == stored.shape, "checkpoint {}: {}: dataset {} has shape {}, the manifest says {}", dir,
              piece.file(), piece.dataset(), box_shape_str(shape), box_shape_str(stored.shape));
    std::vector<int64_t> src(part->offset.size()), at(part->offset.size());
    for (size_t d = 0; d < src.size(); ++d) {
      src[d] = part->offset[d] - stored.offset[d];
      at[d] = part->offset[d] - dst_box.offset[d];
    }
    try {
      file.read(piece.dataset(), src, part->shape, dst, dst_box.shape, at, batch);
    } catch (const Error&) {
      files.check(piece.file());  // a damaged file is reported as such
      throw;
    }
    covered += part->numel();
  }
  MOE_CHECK(covered == want.numel(), "checkpoint {}: the pieces of {} ({}) cover {} of the {} elements of box {} at {}",
            dir, t.name(), kind_label(t.kind()), covered, want.numel(), box_shape_str(want.shape),
            box_shape_str(want.offset));
}

}  // namespace

LoadedState load(const std::string& step_dir, ParamRegistry& registry, DistributedOptimizer* optimizer,
                 Comm* pipeline, bool verify_sha256) {
  LoadedState out;
  out.path = step_dir;
  out.manifest = read_manifest(step_dir);
  const Manifest& m = out.manifest;
  // Which stored tensors some stage of the pipeline holds (the all-reduce comes before any check
  // that can fail on one rank alone, so no rank is left waiting in it).
  std::vector<int32_t> held;
  for (const TensorEntry& t : m.tensors()) held.push_back(registry.contains(t.name()) ? 1 : 0);
  if (pipeline && pipeline->size() > 1) {
    const Tensor any = Tensor::from_ints({static_cast<int64_t>(held.size())}, held);
    pipeline->all_reduce(any, ReduceOp::kMax);
    held.assign(any.data<int32_t>(), any.data<int32_t>() + held.size());
  }
  std::map<std::pair<std::string, int>, const TensorEntry*> index;
  for (int i = 0; i < m.tensors_size(); ++i) {
    const TensorEntry& t = m.tensors(i);
    index[{t.name(), static_cast<int>(t.kind())}] = &t;
    MOE_CHECK(held[i] != 0,
              "checkpoint {}: tensor {} is not a parameter of this model (a checkpoint of another model?)", step_dir,
              t.name());
  }
  ShardFiles files(step_dir, m, verify_sha256);
  // Parameters and moments read straight into their tensors are queued and read together at the
  // end (ZeRO-1's partial moments go through a scratch block, read at once).
  ChunkReads batch;
  for (Param& p : registry.params()) {
    const Box want = stored_block(p);
    Box local{want.offset, std::vector<int64_t>(p.value.shape().dims().begin(), p.value.shape().dims().end())};
    std::vector<TensorKind> kinds{PARAM};
    if (optimizer && p.spec.trainable) kinds.insert(kinds.end(), {EXP_AVG, EXP_AVG_SQ});
    for (const TensorKind kind : kinds) {
      const auto it = index.find({p.spec.name, static_cast<int>(kind)});
      MOE_CHECK(it != index.end(), "checkpoint {}: no {} {} in the checkpoint (a checkpoint of another model?)",
                step_dir, kind_label(kind), p.spec.name);
      const TensorEntry& t = *it->second;
      MOE_CHECK(t.dtype() == "f32", "checkpoint {}: {} {} is stored as {}, expected f32", step_dir, kind_label(kind),
                p.spec.name, t.dtype());
      const std::vector<int64_t> want_shape = stored_shape(p.spec);
      MOE_CHECK(to_vec(t.shape()) == want_shape,
                "checkpoint {}: {} {} has global shape {} in the checkpoint, the model has {} (another model shape?)",
                step_dir, kind_label(kind), p.spec.name, box_shape_str(to_vec(t.shape())), box_shape_str(want_shape));
      if (want.numel() == 0) continue;  // this rank's block is all padding
      if (kind == PARAM) {
        read_box(step_dir, t, want, local, p.value.data<float>(), files, &batch);
        continue;
      }
      // Moments: the full local block, then this rank's owned range of it (without ZeRO-1, the
      // whole block, read straight into the state).
      AdamW& adamw = optimizer->adamw();
      const ElementRange r = adamw.owned_range(p.spec.name);
      Tensor& state = kind == EXP_AVG ? adamw.exp_avg(p.spec.name) : adamw.exp_avg_sq(p.spec.name);
      MOE_CHECK(state.numel() == r.size(), "checkpoint: AdamW state of {} has {} elements, its owned range {}",
                p.spec.name, state.numel(), r.size());
      if (r.size() == p.value.numel()) {
        read_box(step_dir, t, want, local, state.data<float>(), files, &batch);
        continue;
      }
      std::vector<float> block(static_cast<size_t>(p.value.numel()), 0.0f);
      read_box(step_dir, t, want, local, block.data(), files);
      if (r.size() > 0) std::memcpy(state.data<float>(), block.data() + r.begin, static_cast<size_t>(r.size()) * sizeof(float));
    }
  }
  batch.run([&](const std::string& path) { files.check(fs::path(path).filename().string()); });
  files.check_all();
  if (optimizer) optimizer->adamw().set_steps(m.optimizer_steps());
  return out;
}

std::vector<std::string> verify(const std::string& step_dir) {
  std::vector<std::string> problems;
  const Manifest m = read_manifest(step_dir);
  // Where the manifest puts each dataset: (file, dataset) -> tensor and piece.
  std::map<std::pair<std::string, std::string>, std::pair<const TensorEntry*, const Piece*>> where;
  for (const TensorEntry& t : m.tensors())
    for (const Piece& piece : t.pieces()) where[{piece.file(), piece.dataset()}] = {&t, &piece};
  for (const File& f : m.files()) {
    const std::string path = (fs::path(step_dir) / f.name()).string();
    if (!fs::exists(path)) {
      problems.push_back(fmt::format("{}: missing", f.name()));
      continue;
    }
    const FileDigest d = digest_file(path);
    if (d.size != f.size() || d.sha256 != f.sha256())
      problems.push_back(fmt::format("{}: size {} / SHA-256 {}, the manifest says {} / {}", f.name(), d.size, d.sha256,
                                     f.size(), f.sha256()));
    try {
      const H5File file = H5File::open(path);
      if (const auto bad = damaged_dataset(file)) problems.push_back(*bad);
      for (const std::string& ds : file.datasets()) {
        const auto it = where.find({f.name(), ds});
        if (it == where.end()) {
          problems.push_back(fmt::format("{}: dataset {} is not in the manifest", f.name(), ds));
          continue;
        }
        const BlockAttrs a = file.attrs(ds);
        const TensorEntry& t = *it->second.first;
        if (a.name != t.name() || a.global_shape != to_vec(t.shape()) || a.offset != to_vec(it->second.second->offset()))
          problems.push_back(fmt::format("{}: dataset {}: its attributes (name {}, global shape {}, offset {}) "
                                         "disagree with the manifest",
                                         f.name(), ds, a.name, box_shape_str(a.global_shape), box_shape_str(a.offset)));
      }
    } catch (const Error& e) {
      problems.push_back(e.what());
    }
  }
  for (const auto& [key, value] : where)
    if (std::none_of(m.files().begin(), m.files().end(), [&](const File& f) { return f.name() == key.first; }))
      problems.push_back(fmt::format("{}: holds dataset {} by the manifest but is not among its files", key.first,
                                     key.second));
  return problems;
}

}  // namespace moeforge::checkpoint
