// AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization", Algorithm 2) over every
// parameter of a ParamRegistry.
//
// One step with learning rate lr, at step count t (the first step has t = 1), per element:
//   p <- p * (1 - lr * wd)                      only where the parameter's spec.weight_decay is set
//   m <- beta1 * m + (1 - beta1) * g
//   v <- beta2 * v + (1 - beta2) * g^2
//   p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
// This is torch.optim.AdamW's formula and order of operations exactly (decay applied to the
// pre-update weights; eps added after the bias-corrected square root). The scalar coefficients
// are formed in double and rounded to f32 once, as PyTorch does with its Python-float scalars.
//
// State lives in model coordinates: for each parameter an f32 exp_avg (m) and exp_avg_sq (v) of
// the parameter's local shape, reachable by its canonical name, so checkpoints store and reshard
// them like the parameters themselves. The registry's values are the fp32 master weights.
//
// Devices: the state lives on the device of its parameter. CPU parameters are updated by the loop
// in adamw.cpp; CUDA parameters by one multi-tensor launch (runtime/cuda/adamw.h) with the same
// formula and the same f32 coefficients.
//
// Sharded state (ZeRO-1): an optional `owned` function gives, per parameter, the range of its
// flattened local elements this rank updates ([0, numel) by default; an empty range is allowed).
// State then covers only that range: for a whole parameter it has the parameter's shape, for a
// part it is 1-D of the range's length, at owned_range(name).begin of the flattened parameter.
// Non-trainable entries (ParamSpec::trainable false) own no elements.
//
// The registry must not gain parameters after the optimizer is built. step() reads the gradients
// as they are (already accumulated, averaged and clipped by the caller) and does not zero them.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <unordered_map>
#include <vector>

#include "models/param_registry.h"

namespace moeforge {

struct AdamWOptions {
  float beta1 = 0.9f, beta2 = 0.95f, eps = 1e-8f, weight_decay = 0.1f;
};

// Elements [begin, end) of a parameter's flattened local tensor.
struct ElementRange {
  int64_t begin = 0, end = 0;
  int64_t size() const { return end - begin; }
};

class AdamW {
 public:
  // Validates the options (an Error names the config field, e.g. "optim.beta2 (1) must be in
  // [0, 1)") and allocates zeroed state for every registered parameter.
  AdamW(ParamRegistry& registry, AdamWOptions options,
        const std::function<ElementRange(const Param&)>& owned = nullptr);

  // One update of every parameter with learning rate lr (finite, >= 0).
  void step(float lr);

  int64_t steps() const { return steps_; }  // completed steps
  void set_steps(int64_t steps);           // for resume: the next step() uses t = steps + 1

  // State of the parameter with this canonical name, (local shape of the parameter) f32.
  const Tensor& exp_avg(const std::string& name) const { return state(name).exp_avg; }
  const Tensor& exp_avg_sq(const std::string& name) const { return state(name).exp_avg_sq; }
  // For resume: the checkpoint loader writes into (or replaces) these; step() checks the shapes.
  Tensor& exp_avg(const std::string& name) { return state(name).exp_avg; }
  Tensor& exp_avg_sq(const std::string& name) { return state(name).exp_avg_sq; }
  ElementRange owned_range(const std::string& name) const { return state(name).range; }

 private:
  struct State {
    ElementRange range;  // owned elements of the flattened parameter
    Tensor exp_avg;      // m: the parameter's shape when whole, else (range.size())
    Tensor exp_avg_sq;   // v: likewise
  };
  const State& state(const std::string& name) const;
  State& state(const std::string& name);

  ParamRegistry* registry_;
  AdamWOptions options_;
  int64_t steps_ = 0;
  std::vector<State> state_;  // in registry order
  std::unordered_map<std::string, size_t> index_;
};

}  // namespace moeforge
