// The parameter registry: the one place that knows every parameter's canonical name, global
// shape and sharding. Initialisation, gradient sync, grad-norm, the optimizer, checkpoints,
// resharding, export and import all iterate it; no other code knows how a tensor is split.
//
// A parameter is split along at most one dimension, over one group (TP or EP); it is replicated
// over every other group of the layout. Dense parameters reduce their gradients over DP, expert
// parameters over expert-DP. The local tensor of a rank is the block at `slice` of the global one
// and is initialised from the counter-based RNG as exactly that block (runtime/rng.h), so any
// layout starts from the single-rank model's numbers.
//
// Parameters have stable addresses for the registry's lifetime (layers keep Param pointers).
// Values and gradients live on the registry's device (the CPU, or this rank's GPU in a CUDA run);
// code that reads them on the host copies them first (models/device_tensors.h).
#pragma once

#include <deque>
#include <string>
#include <string_view>
#include <unordered_map>

#include "runtime/rng.h"
#include "runtime/tensor.h"

namespace moeforge {

// The group a parameter's sharded dimension is split over.
enum class ShardGroup : uint8_t { kNone, kTP, kEP };

enum class ParamInit : uint8_t { kNormal, kOnes, kZeros };

struct ParamSpec {
  std::string name;  // canonical, e.g. "layers.3.moe.experts.w1"
  Shape global_shape;
  int shard_dim = -1;  // -1: not split
  ShardGroup shard_group = ShardGroup::kNone;
  bool expert = false;  // gradients reduce over expert-DP instead of DP
  ParamInit init = ParamInit::kNormal;
  float init_std = 0.0f;      // for kNormal
  bool weight_decay = true;   // false for norm weights
  // Trailing rows of dim 0 that only pad the tensor to a split-friendly size (the vocabulary
  // rounded up to a multiple of tp). They are never read by the model; checkpoints, exports and
  // layout comparisons skip them.
  int64_t padded_rows = 0;
  // False for state the model updates itself rather than by gradient (the aux-loss-free expert
  // bias): no optimizer state, no gradient reduction, not in the grad norm; checkpoints keep it.
  bool trainable = true;
  // Tied embeddings under pipeline parallelism: the first stage holds embed.weight and the last
  // stage a replica of it for the LM head. Both are `tied` (their gradients are summed over the
  // embed group before any other reduction, so both copies take the same steps); the last
  // stage's is the `replica` (not counted in the grad norm, not written by checkpoints).
  bool tied = false;
  bool replica = false;
};

// This rank's coordinates in the groups parameters are split over.
struct ShardLayout {
  int tp_size = 1, tp_rank = 0;
  int ep_size = 1, ep_rank = 0;
};

struct Param {
  ParamSpec spec;
  ShardSlice slice;  // where `value` sits in the global tensor
  Tensor value;      // local shard, f32, on the registry's device (the fp32 master weights)
  Tensor grad;       // same shape and device as value, f32; accumulated by backward
  // What the forward and backward read: `value` itself when the model computes in f32, a bf16
  // copy of it in mixed precision (trainable parameters; state such as the expert bias stays
  // `value`). ParamRegistry::refresh_compute() rounds the masters into the copies.
  Tensor compute;
};

class ParamRegistry {
 public:
  explicit ParamRegistry(ShardLayout layout = {}, Device device = Device::cpu()) : layout_(layout), device_(device) {}
  ParamRegistry(const ParamRegistry&) = delete;
  ParamRegistry& operator=(const ParamRegistry&) = delete;

  // Registers a parameter, computes its local shard under the layout and allocates value and
  // grad (zeroed). Names must be unique; a split dimension must divide evenly.
  Param& add(ParamSpec spec);

  Param& get(std::string_view name);
  const Param& get(std::string_view name) const;
  bool contains(std::string_view name) const { return index_.count(std::string(name)) > 0; }

  std::deque<Param>& params() { return params_; }
  const std::deque<Param>& params() const { return params_; }
  const ShardLayout& layout() const { return layout_; }
  // Where every value and gradient is allocated.
  Device device() const { return device_; }

  // Fills every value from (seed, name, global index): the same numbers on every device (normal
  // values are drawn on the host and copied to a GPU). Refreshes the compute copies.
  void init(uint64_t seed);
  // The dtype the model computes in (after every parameter is added): kBF16 allocates a bf16
  // compute copy of every trainable parameter and fills it from the values.
  void set_compute_dtype(DType dtype);
  DType compute_dtype() const { return compute_dtype_; }
  // Rounds the values into the bf16 compute copies: after anything writes values (init, an
  // optimizer step, a checkpoint load). Nothing in f32 mode.
  void refresh_compute();
  void zero_grad();
  // Elements of the global parameters (each counted once) and of the local shards.
  int64_t global_numel() const;
  int64_t local_numel() const;

 private:
  ShardLayout layout_;
  Device device_;
  DType compute_dtype_ = DType::kF32;
  std::deque<Param> params_;
  std::unordered_map<std::string, size_t> index_;
};

}  // namespace moeforge
