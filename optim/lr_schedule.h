// Learning-rate schedules: linear warmup, then cosine decay, warmup-stable-decay (WSD) or a
// constant rate.
//
// `step` is 0-based: lr(step) is the rate used by the update of step `step`, for step in
// [0, total). With W = warmup_steps, T = total_steps, P = peak_lr, m = min_lr:
//
//   warmup   (step < W):  P * (step + 1) / W         step W-1 reaches P; step 0 is not 0
//   cosine   (step >= W): m + (P - m) * (1 + cos(pi * q)) / 2,  q = (step - W) / max(1, T - W - 1)
//                         the first post-warmup step gets P and the last step (T-1) gets m
//                         exactly; a single post-warmup step gets P.
//   WSD      (step >= W): P for step < S, then P + (m - P) * (step - S + 1) / (T - S) for
//                         step >= S, with S = max(W, T - max(1, round(decay_fraction * T)))
//                         (round half away from zero). The decay is the straight line from the
//                         last stable step (S-1, at P) to the last step (T-1, at m), so every
//                         decay step lowers the rate and step T-1 gets m exactly.
//   constant (step >= W): P
//
// When W == T every step is a warmup step and the schedule never decays.
#pragma once

#include <cstdint>

namespace moeforge {

enum class LrScheduleKind { kCosine, kWsd, kConstant };

struct LrScheduleOptions {
  float peak_lr, min_lr;
  int64_t warmup_steps, total_steps;
  LrScheduleKind kind;
  float decay_fraction = 0.2f;  // WSD only: fraction of total_steps spent decaying, in (0, 1]
};

class LrSchedule {
 public:
  // Validates the options; an Error names the config field (optim.lr, optim.min_lr,
  // optim.warmup_steps, optim.decay_fraction, train.steps), e.g.
  // "optim.warmup_steps (20) exceeds train.steps (10)". min_lr is checked only by the kinds that
  // decay to it, decay_fraction only by WSD.
  explicit LrSchedule(LrScheduleOptions o);

  float lr(int64_t step) const;

 private:
  LrScheduleOptions o_;
  int64_t decay_start_;  // WSD: S above
};

}  // namespace moeforge
