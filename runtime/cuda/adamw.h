// Multi-tensor AdamW on the device, with fp32 master weights: the CUDA counterpart of the update
// loop in optim/adamw.cpp (same formula, same per-step coefficients; kernel in adamw.cu).
//
// Each entry updates one fp32 master tensor from its f32 gradient and f32 moments, all on the same
// CUDA device and of equal element count; when `param_bf16` is defined (mixed precision) the
// updated master is also rounded into that bf16 tensor, the weights the next step computes with.
// All entries go out in a few launches on the device's compute stream; nothing waits.
#pragma once

#include <span>

#include "runtime/cuda/launchers.h"
#include "runtime/tensor.h"

namespace moeforge::cuda {

using launch::AdamWCoefficients;

struct AdamWEntry {
  Tensor master;      // f32, updated in place
  Tensor grad;        // f32
  Tensor exp_avg;     // f32, updated in place
  Tensor exp_avg_sq;  // f32, updated in place
  Tensor param_bf16;  // bf16 or undefined
  bool weight_decay = false;
};

void adamw_step(std::span<const AdamWEntry> entries, const AdamWCoefficients& c);

}  // namespace moeforge::cuda
