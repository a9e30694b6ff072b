#include "optim/lr_schedule.h"

#include <algorithm>
#include <cmath>
#include <numbers>

#include "runtime/error.h"

namespace moeforge {

LrSchedule::LrSchedule(LrScheduleOptions o) : o_(o) {
  MOE_CHECK(o.total_steps > 0, "train.steps ({}) must be positive", o.total_steps);
  MOE_CHECK(o.warmup_steps >= 0, "optim.warmup_steps ({}) must not be negative", o.warmup_steps);
  MOE_CHECK(o.warmup_steps <= o.total_steps, "optim.warmup_steps ({}) exceeds train.steps ({})", o.warmup_steps,
            o.total_steps);
  MOE_CHECK(o.peak_lr > 0.0f && std::isfinite(o.peak_lr), "optim.lr ({}) must be positive and finite", o.peak_lr);
  if (o.kind != LrScheduleKind::kConstant) {
    MOE_CHECK(o.min_lr >= 0.0f && std::isfinite(o.min_lr), "optim.min_lr ({}) must be non-negative and finite",
              o.min_lr);
    MOE_CHECK(o.min_lr <= o.peak_lr, "optim.min_lr ({}) exceeds optim.lr ({})", o.min_lr, o.peak_lr);
  }
  decay_start_ = o.total_steps;
  if (o.kind == LrScheduleKind::kWsd) {
    MOE_CHECK(o.decay_fraction > 0.0f && o.decay_fraction <= 1.0f, "optim.decay_fraction ({}) must be in (0, 1]",
              o.decay_fraction);
    // At least one decay step, so the last step always reaches min_lr.
    const int64_t decay_steps =
        std::max<int64_t>(1, std::llround(static_cast<double>(o.decay_fraction) * static_cast<double>(o.total_steps)));
    decay_start_ = std::max(o.warmup_steps, o.total_steps - decay_steps);
  }
}

float LrSchedule::lr(int64_t step) const {
  MOE_CHECK(step >= 0 && step < o_.total_steps, "LrSchedule::lr: step {} is outside [0, {})", step, o_.total_steps);
  const double peak = o_.peak_lr, min = o_.min_lr;
  const int64_t w = o_.warmup_steps, total = o_.total_steps;
  if (step < w) return static_cast<float>(peak * static_cast<double>(step + 1) / static_cast<double>(w));
  switch (o_.kind) {
    case LrScheduleKind::kConstant: return o_.peak_lr;
    case LrScheduleKind::kCosine: {
      const double q = static_cast<double>(step - w) / static_cast<double>(std::max<int64_t>(1, total - w - 1));
      return static_cast<float>(min + 0.5 * (peak - min) * (1.0 + std::cos(std::numbers::pi * q)));
    }
    case LrScheduleKind::kWsd: {
      if (step < decay_start_) return o_.peak_lr;
      const double q = static_cast<double>(step - decay_start_ + 1) / static_cast<double>(total - decay_start_);
      return static_cast<float>(peak + (min - peak) * q);
    }
  }
  MOE_THROW("LrSchedule::lr: unknown schedule kind {}", static_cast<int>(o_.kind));
}

}  // namespace moeforge
