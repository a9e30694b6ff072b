// Where a parameter's numbers live in a checkpoint: which rank writes them, and the boxes
// (offset + shape in global coordinates) of stored and local blocks.
//
// One replica writes each block: a rank writes a parameter iff it is rank 0 of the group over
// which that parameter's local block is replicated (parallel/process_grid.h for the groups):
//   split over TP (ShardGroup::kTP)   replicated over DP          -> dp rank 0
//   split over EP (ShardGroup::kEP)   replicated over expert-DP   -> expert-DP rank 0
//   not split                         replicated over the stage   -> stage rank 0 (tp 0, dp 0)
// Each pipeline stage writes its own layers; the last stage's replica of tied embeddings is not
// written (the first stage's copy is). The AdamW moments of a parameter are written by the
// same rank, in the same box.
//
// Stored shapes leave out padding rows (ParamSpec::padded_rows): they depend on the layout (the
// vocabulary is padded to a multiple of tp) and hold no model numbers, so a checkpoint's
// embedding is (vocab, C) whatever tp wrote it.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "models/param_registry.h"
#include "parallel/process_grid.h"

namespace moeforge::checkpoint {

// A box of a global tensor: elements [offset[d], offset[d] + shape[d]) of every dim d.
struct Box {
  std::vector<int64_t> offset, shape;
  int64_t numel() const;
};

// The intersection of two boxes of the same rank, nullopt when empty.
std::optional<Box> intersect(const Box& a, const Box& b);

// True when the rank with this world rank, in a grid of these sizes, writes parameter `spec`.
bool writes(const ParamSpec& spec, const ParallelSizes& sizes, int world_rank);

// The parameter's global shape without its padding rows.
std::vector<int64_t> stored_shape(const ParamSpec& spec);
// The part of this rank's local block inside the stored shape (empty shape entries when the
// local block is all padding).
Box stored_block(const Param& p);

// "(2, 3, 4)"
std::string box_shape_str(const std::vector<int64_t>& shape);

}  // namespace moeforge::checkpoint
