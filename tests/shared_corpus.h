// For MPI tests that train on the shared corpus (../shared/data/tinyshakespeare.txt): rank 0
// prepares it as token shards in `dir` (train/ and val/), every rank of the grid waits for it.
// Header-only: the tests that use it already link the data and parallel libraries.
#pragma once

#include <filesystem>
#include <string>

#include "data/prepare.h"
#include "parallel/process_grid.h"
#include "tests/testing.h"

namespace moeforge::testing {

// False (nothing prepared, no collective issued) when the corpus is missing, so every rank
// skips alike.
inline bool prepare_shared_corpus(const ProcessGrid& grid, const std::filesystem::path& dir) {
  const std::string corpus = source_path("../shared/data/tinyshakespeare.txt");
  if (!std::filesystem::exists(corpus)) return false;
  if (grid.world_rank() == 0) {
    std::filesystem::remove_all(dir);
    data::prepare({.inputs = {corpus}, .output_dir = dir.string(), .val_fraction = 0.1});
  }
  grid.world().barrier();
  return true;
}

}  // namespace moeforge::testing
