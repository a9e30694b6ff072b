#include "checkpoint/tensor_reader.h"

#include <filesystem>

#include "checkpoint/files.h"

namespace moeforge::checkpoint {

namespace fs = std::filesystem;

CheckpointReader::CheckpointReader(std::string step_dir) : dir_(std::move(step_dir)), manifest_(read_manifest(dir_)) {
  for (const TensorEntry& t : manifest_.tensors())
    if (t.kind() == PARAM) params_[t.name()] = &t;
}

std::vector<int64_t> CheckpointReader::shape(const std::string& name) const {
  const auto it = params_.find(name);
  MOE_CHECK(it != params_.end(), "checkpoint {}: no parameter {} (a checkpoint of another model?)", dir_, name);
  return {it->second->shape().begin(), it->second->shape().end()};
}

const H5File& CheckpointReader::file(const std::string& name) {
  if (const auto it = open_.find(name); it != open_.end()) return it->second;
  const File* entry = nullptr;
  for (const File& f : manifest_.files())
    if (f.name() == name) entry = &f;
  MOE_CHECK(entry, "checkpoint {}: a piece names file {}, which the manifest does not list", dir_, name);
  const std::string path = (fs::path(dir_) / name).string();
  MOE_CHECK(fs::exists(path), "checkpoint {}: shard file {} is missing", dir_, name);
  const FileDigest d = digest_file(path);
  MOE_CHECK(d.size == entry->size() && d.sha256 == entry->sha256(),
            "checkpoint {}: shard file {} is corrupt: size {} / SHA-256 {}, the manifest says {} / {} "
            "(`moeforge inspect` names the damaged dataset)",
            dir_, name, d.size, d.sha256, entry->size(), entry->sha256());
  return open_.emplace(name, H5File::open(path)).first->second;
}

std::vector<float> CheckpointReader::read(const std::string& name, const Box& box) {
  const std::vector<int64_t> global = shape(name);
  const TensorEntry& t = *params_.at(name);
  MOE_CHECK(t.dtype() == "f32", "checkpoint {}: {} is stored as {}, expected f32", dir_, name, t.dtype());
  MOE_CHECK(box.offset.size() == global.size() && box.shape.size() == global.size(),
            "checkpoint {}: box of rank {} for {} of shape {}", dir_, box.shape.size(), name, box_shape_str(global));
  for (size_t d = 0; d < global.size(); ++d)
    MOE_CHECK(box.offset[d] >= 0 && box.shape[d] >= 0 && box.offset[d] + box.shape[d] <= global[d],
              "checkpoint {}: box {} at {} is outside {} of shape {}", dir_, box_shape_str(box.shape),
              box_shape_str(box.offset), name, box_shape_str(global));
  std::vector<float> out(static_cast<size_t>(box.numel()));
  int64_t covered = 0;
  for (const Piece& piece : t.pieces()) {
    const Box stored{{piece.offset().begin(), piece.offset().end()}, {piece.shape().begin(), piece.shape().end()}};
    const std::optional<Box> part = intersect(stored, box);
    if (!part) continue;
    const H5File& f = file(piece.file());
    MOE_CHECK(f.f32_shape(piece.dataset()) == stored.shape, "checkpoint {}: {}: dataset {} does not have shape {}",
              dir_, piece.file(), piece.dataset(), box_shape_str(stored.shape));
    std::vector<int64_t> src(global.size()), at(global.size());
    for (size_t d = 0; d < global.size(); ++d) {
      src[d] = part->offset[d] - stored.offset[d];
      at[d] = part->offset[d] - box.offset[d];
    }
    f.read(piece.dataset(), src, part->shape, out.data(), box.shape, at);
    covered += part->numel();
  }
  MOE_CHECK(covered == box.numel(), "checkpoint {}: the pieces of {} cover {} of the {} elements of box {} at {}", dir_,
            name, covered, box.numel(), box_shape_str(box.shape), box_shape_str(box.offset));
  return out;
}

std::vector<float> CheckpointReader::read(const std::string& name) {
  const std::vector<int64_t> s = shape(name);
  return read(name, Box{std::vector<int64_t>(s.size(), 0), s});
}

}  // namespace moeforge::checkpoint
