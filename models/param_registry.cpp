#include "models/param_registry.h"

#include "models/device_tensors.h"
#include "runtime/ops.h"

namespace moeforge {

Param& ParamRegistry::add(ParamSpec spec) {
  MOE_CHECK(!contains(spec.name), "parameter {} is registered twice", spec.name);
  const Shape& g = spec.global_shape;
  std::array<int64_t, Shape::kMaxDims> local{};
  for (int d = 0; d < g.ndim(); ++d) local[d] = g[d];

  Param p;
  p.slice.global_shape = g;
  if (spec.shard_dim >= 0) {
    MOE_CHECK(spec.shard_dim < g.ndim(), "parameter {}: shard_dim {} is outside its shape {}", spec.name,
              spec.shard_dim, g.str());
    MOE_CHECK(spec.shard_group != ShardGroup::kNone, "parameter {}: shard_dim set without a shard group", spec.name);
    const bool tp = spec.shard_group == ShardGroup::kTP;
    const int size = tp ? layout_.tp_size : layout_.ep_size;
    const int rank = tp ? layout_.tp_rank : layout_.ep_rank;
    MOE_CHECK(g[spec.shard_dim] % size == 0, "parameter {}: dim {} of shape {} does not divide over {} {} ranks",
              spec.name, spec.shard_dim, g.str(), size, tp ? "TP" : "EP");
    local[spec.shard_dim] = g[spec.shard_dim] / size;
    p.slice.offset[spec.shard_dim] = local[spec.shard_dim] * rank;
  }
  const Shape local_shape(std::span<const int64_t>(local.data(), static_cast<size_t>(g.ndim())));
  p.value = zeros_on(local_shape, DType::kF32, device_);
  p.grad = zeros_on(local_shape, DType::kF32, device_);
  p.compute = p.value;
  MOE_CHECK(compute_dtype_ == DType::kF32, "parameter {}: added after the registry's compute dtype was set", spec.name);
  p.spec = std::move(spec);
  index_.emplace(p.spec.name, params_.size());
  params_.push_back(std::move(p));
  return params_.back();
}

Param& ParamRegistry::get(std::string_view name) {
  const auto it = index_.find(std::string(name));
  MOE_CHECK(it != index_.end(), "no parameter named {}", name);
  return params_[it->second];
}

const Param& ParamRegistry::get(std::string_view name) const {
  const auto it = index_.find(std::string(name));
  MOE_CHECK(it != index_.end(), "no parameter named {}", name);
  return params_[it->second];
}

void ParamRegistry::init(uint64_t seed) {
  for (Param& p : params_) {
    switch (p.spec.init) {
      case ParamInit::kNormal: {
        // The counter-based RNG runs on the host; a GPU parameter receives a copy of its values.
        const Tensor values = device_.is_cpu() ? p.value : Tensor::empty(p.value.shape(), DType::kF32);
        init_normal(values, seed, p.spec.name, p.slice, p.spec.init_std);
        if (!device_.is_cpu()) copy_across(values, p.value);
        break;
      }
      case ParamInit::kOnes: ops::fill(p.value, 1.0f); break;
      case ParamInit::kZeros: ops::fill(p.value, 0.0f); break;
    }
  }
  refresh_compute();
}

void ParamRegistry::zero_grad() {
  for (Param& p : params_) ops::fill(p.grad, 0.0f);
}

int64_t ParamRegistry::global_numel() const {
  int64_t n = 0;
  for (const Param& p : params_) n += p.spec.global_shape.numel();
  return n;
}

int64_t ParamRegistry::local_numel() const {
  int64_t n = 0;
  for (const Param& p : params_) n += p.value.numel();
  return n;
}

void ParamRegistry::set_compute_dtype(DType dtype) {
  MOE_CHECK(dtype == DType::kF32 || dtype == DType::kBF16, "ParamRegistry: compute dtype must be f32 or bf16, got {}",
            dtype_name(dtype));
  compute_dtype_ = dtype;
  for (Param& p : params_)
    p.compute = dtype == DType::kF32 || !p.spec.trainable ? p.value : Tensor::empty(p.value.shape(), dtype, device_);
  refresh_compute();
}

void ParamRegistry::refresh_compute() {
  for (Param& p : params_)
    if (!p.compute.shares_storage(p.value)) ops::cast(p.value, p.compute);
}

}  // namespace moeforge
