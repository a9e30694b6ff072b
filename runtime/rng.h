// Counter-based random numbers (Philox-4x32-10, Salmon et al., SC'11).
//
// Layout invariance starts here: a parameter's value at global element index g depends only on
// (seed, parameter name, g). init_normal() on any shard — rows of an expert tensor, columns of a
// column-parallel weight, a ZeRO slice — therefore writes exactly that slice of the tensor the
// single-rank run initialises. There is no generator state to carry between calls.
#pragma once

#include <array>
#include <cstdint>
#include <span>
#include <string_view>

#include "runtime/tensor.h"

namespace moeforge {

using PhiloxBlock = std::array<uint32_t, 4>;
using PhiloxKey = std::array<uint32_t, 2>;

// Ten rounds of Philox-4x32 on one 128-bit counter.
PhiloxBlock philox4x32(PhiloxBlock counter, PhiloxKey key);

// The Philox key of a named stream: FNV-1a of the name, mixed with the seed.
PhiloxKey philox_key(uint64_t seed, std::string_view name);

// Standard normal for global element index `index` of the stream `key` (Box-Muller on the first
// two words of the block at counter (index, 0)).
float philox_normal(PhiloxKey key, uint64_t index);
// Uniform in (0, 1) for element `index`, from the first word of its block.
double philox_uniform(PhiloxKey key, uint64_t index);

// Where a local tensor sits inside its global tensor: the global shape and, per dim, the offset
// of the local block. A block of the local shape at these offsets must fit inside the global one.
struct ShardSlice {
  Shape global_shape;
  std::array<int64_t, Shape::kMaxDims> offset{};

  static ShardSlice whole(const Shape& shape) { return {shape, {}}; }
};

// Fills the CPU fp32 tensor `t` with mean 0, standard deviation `std`, as the block `slice` of
// the global tensor named `name`.
void init_normal(const Tensor& t, uint64_t seed, std::string_view name, const ShardSlice& slice, float std);

}  // namespace moeforge
