// Reading parameters out of a checkpoint one tensor (or one box of a tensor) at a time, whatever
// layout wrote it: the export path's view of a checkpoint. Each read assembles the requested box
// from the stored pieces that intersect it (HDF5 hyperslabs straight into place), so memory is
// the box, never the whole model.
//
// Integrity as in checkpoint/load.h: before the first read from a shard file its size and
// SHA-256 are checked against the manifest, and every element of a requested box must be covered
// exactly once by the pieces; otherwise an Error names the checkpoint, the file or the tensor.
//
// Threads: HDF5 is used from the calling thread; no save may be in flight in this process.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "checkpoint/checkpoint.pb.h"
#include "checkpoint/hdf5_io.h"
#include "checkpoint/placement.h"

namespace moeforge::checkpoint {

class CheckpointReader {
 public:
  // step_dir: a step directory (see checkpoint/files.h resolve_checkpoint for user paths).
  explicit CheckpointReader(std::string step_dir);

  const std::string& dir() const { return dir_; }
  const Manifest& manifest() const { return manifest_; }
  bool contains(const std::string& name) const { return params_.count(name) > 0; }
  // The stored (unpadded) global shape of parameter `name`; throws when it is not stored.
  std::vector<int64_t> shape(const std::string& name) const;
  // The parameter's values on `box` (row-major box.shape), or the whole tensor.
  std::vector<float> read(const std::string& name, const Box& box);
  std::vector<float> read(const std::string& name);

 private:
  const H5File& file(const std::string& name);

  std::string dir_;
  Manifest manifest_;
  std::map<std::string, const TensorEntry*> params_;
  std::map<std::string, H5File> open_;
};

}  // namespace moeforge::checkpoint
