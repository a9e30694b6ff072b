// Global gradient-norm clipping over a ParamRegistry (as torch.nn.utils.clip_grad_norm_).
//
// The norm is the L2 norm of all gradients together, each unique element counted once: on one
// rank that is every parameter of the registry once. (Under TP/EP/DP the parallel layer sums the
// squares over its groups so replicated elements still count once; this module is the one-rank
// form.) Squares are accumulated in double, parameter by parameter in registry order, so the
// result is deterministic for a given thread count.
#pragma once

#include "models/param_registry.h"

namespace moeforge {

// sqrt of the sum of squares of every gradient element.
double global_grad_norm(const ParamRegistry& registry);

// Scales every gradient by max_norm / (norm + 1e-6) when norm > max_norm (the 1e-6 is torch's,
// keeping the factor finite for tiny norms); max_norm == 0 disables clipping. A non-finite norm
// leaves the gradients untouched: the caller sees it in the returned value and decides (scaling
// by it would only turn every gradient into NaN or 0). Returns the norm before clipping.
double clip_grad_norm(ParamRegistry& registry, double max_norm);

}  // namespace moeforge
