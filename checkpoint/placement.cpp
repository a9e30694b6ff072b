#include "checkpoint/placement.h"

#include <algorithm>

#include <fmt/format.h>

namespace moeforge::checkpoint {

int64_t Box::numel() const {
  int64_t n = 1;
  for (const int64_t s : shape) n *= s;
  return n;
}

std::optional<Box> intersect(const Box& a, const Box& b) {
  Box r;
  for (size_t d = 0; d < a.shape.size(); ++d) {
    const int64_t lo = std::max(a.offset[d], b.offset[d]);
    const int64_t hi = std::min(a.offset[d] + a.shape[d], b.offset[d] + b.shape[d]);
    if (hi <= lo) return std::nullopt;
    r.offset.push_back(lo);
    r.shape.push_back(hi - lo);
  }
  return r;
}

bool writes(const ParamSpec& spec, const ParallelSizes& sizes, int world_rank) {
  // World rank = pp * (dp * tp) + dp_rank * tp + tp_rank; a stage's ranks in order
  // pos = dp_rank * tp + tp_rank are cut into EP groups of `ep` consecutive ranks, and the
  // expert-DP group of a rank is its position inside its EP group (its expert-DP rank is pos / ep).
  if (spec.replica) return false;  // the last stage's copy of tied embeddings: the first stage writes
  const int pos = world_rank % (sizes.tp * sizes.dp);
  const int dp_rank = pos / sizes.tp;
  switch (spec.shard_group) {
    case ShardGroup::kTP: return dp_rank == 0;
    case ShardGroup::kEP: return pos / sizes.ep == 0;
    case ShardGroup::kNone: return pos == 0;
  }
  return false;
}

std::vector<int64_t> stored_shape(const ParamSpec& spec) {
  std::vector<int64_t> shape(spec.global_shape.dims().begin(), spec.global_shape.dims().end());
  if (!shape.empty()) shape[0] -= spec.padded_rows;
  return shape;
}

Box stored_block(const Param& p) {
  Box local;
  for (int d = 0; d < p.value.ndim(); ++d) {
    local.offset.push_back(p.slice.offset[d]);
    local.shape.push_back(p.value.dim(d));
  }
  const std::vector<int64_t> stored = stored_shape(p.spec);
  if (!local.shape.empty()) {
    local.shape[0] = std::clamp<int64_t>(stored[0] - local.offset[0], 0, local.shape[0]);
  }
  return local;
}

std::string box_shape_str(const std::vector<int64_t>& shape) { return fmt::format("({})", fmt::join(shape, ", ")); }

}  // namespace moeforge::checkpoint
