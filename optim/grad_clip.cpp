#include "optim/grad_clip.h"

#include <cmath>

#include "runtime/ops.h"

namespace moeforge {

double global_grad_norm(const ParamRegistry& registry) {
  double sum = 0.0;
  for (const Param& p : registry.params()) sum += ops::sum_squares(p.grad);
  return std::sqrt(sum);
}

double clip_grad_norm(ParamRegistry& registry, double max_norm) {
  MOE_CHECK(max_norm >= 0.0 && std::isfinite(max_norm), "clip_grad_norm: max_norm must be finite and >= 0, got {}",
            max_norm);
  const double norm = global_grad_norm(registry);
  if (max_norm > 0.0 && std::isfinite(norm) && norm > max_norm) {
    const float scale = static_cast<float>(max_norm / (norm + 1e-6));
    for (Param& p : registry.params()) ops::scale_(p.grad, scale);
  }
  return norm;
}

}  // namespace moeforge
