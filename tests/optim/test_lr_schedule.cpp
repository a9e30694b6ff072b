// Tests optim/lr_schedule.cpp: each schedule at its key steps (first, end of warmup, first
// post-warmup, middle, last) against values worked out by hand from the definitions in the
// header, the WSD decay start, the edge cases of short runs, and the option validation messages.
#include <gtest/gtest.h>

#include <cmath>

#include "optim/lr_schedule.h"
#include "tests/data/temp_dir.h"

namespace moeforge {
namespace {

using testing::error_of;

constexpr float kPeak = 1e-3f, kMin = 1e-4f;

LrSchedule make(LrScheduleKind kind, int64_t warmup, int64_t total, float decay_fraction = 0.2f) {
  return LrSchedule({.peak_lr = kPeak, .min_lr = kMin, .warmup_steps = warmup, .total_steps = total, .kind = kind,
                     .decay_fraction = decay_fraction});
}

// The schedule returns f32; the expectations are exact in double, so allow the f32 rounding only.
void expect_lr(const LrSchedule& s, int64_t step, double want) {
  EXPECT_NEAR(s.lr(step), want, 1e-7 * want) << "step " << step;
}

TEST(LrSchedule, WarmupIsLinearFromPeakOverW) {
  for (LrScheduleKind kind : {LrScheduleKind::kCosine, LrScheduleKind::kWsd, LrScheduleKind::kConstant}) {
    const LrSchedule s = make(kind, 10, 101);
    expect_lr(s, 0, double(kPeak) / 10);  // the first update already moves the weights
    expect_lr(s, 4, double(kPeak) * 5 / 10);
    expect_lr(s, 9, kPeak);
  }
}

TEST(LrSchedule, CosineKeySteps) {
  // W = 10, T = 101: the cosine runs over steps 10..100, q = (step - 10) / 90.
  const LrSchedule s = make(LrScheduleKind::kCosine, 10, 101);
  const double p = kPeak, m = kMin;
  expect_lr(s, 10, p);                                                         // q = 0
  expect_lr(s, 40, m + 0.5 * (p - m) * 1.5);                                   // q = 1/3, cos = 1/2
  expect_lr(s, 55, 0.5 * (p + m));                                             // q = 1/2, cos = 0
  expect_lr(s, 70, m + 0.5 * (p - m) * 0.5);                                   // q = 2/3, cos = -1/2
  expect_lr(s, 100, m);                                                        // q = 1
  EXPECT_EQ(s.lr(100), kMin);
  for (int64_t step = 10; step < 100; ++step) EXPECT_GT(s.lr(step), s.lr(step + 1)) << step;
}

TEST(LrSchedule, CosineWithoutWarmupStartsAtPeak) {
  const LrSchedule s = make(LrScheduleKind::kCosine, 0, 5);  // q = step / 4
  expect_lr(s, 0, kPeak);
  expect_lr(s, 2, 0.5 * (double(kPeak) + kMin));
  expect_lr(s, 4, kMin);
}

TEST(LrSchedule, ShortRuns) {
  // One step after warmup: it is both the first post-warmup step and the last; it gets the peak.
  const LrSchedule one_after = make(LrScheduleKind::kCosine, 3, 4);
  expect_lr(one_after, 2, kPeak);
  expect_lr(one_after, 3, kPeak);
  expect_lr(make(LrScheduleKind::kCosine, 0, 1), 0, kPeak);
  // Warmup over every step: no decay at all.
  const LrSchedule all_warmup = make(LrScheduleKind::kCosine, 4, 4);
  expect_lr(all_warmup, 0, double(kPeak) / 4);
  expect_lr(all_warmup, 3, kPeak);
}

TEST(LrSchedule, WsdKeyStepsAndDecayStart) {
  // W = 10, T = 100, 20 decay steps: S = 80. The line runs from (79, P) to (99, m).
  const LrSchedule s = make(LrScheduleKind::kWsd, 10, 100, 0.2f);
  const double p = kPeak, m = kMin;
  expect_lr(s, 10, p);
  expect_lr(s, 50, p);
  expect_lr(s, 79, p);
  expect_lr(s, 80, p + (m - p) * 1 / 20);
  expect_lr(s, 89, p + (m - p) * 10 / 20);  // halfway
  expect_lr(s, 98, p + (m - p) * 19 / 20);
  expect_lr(s, 99, m);
  EXPECT_EQ(s.lr(79), kPeak);
  EXPECT_LT(s.lr(80), kPeak);
  EXPECT_EQ(s.lr(99), kMin);
}

TEST(LrSchedule, WsdDecayStartRoundsAndRespectsWarmup) {
  // round(0.25 * 10) = 3 (half away from zero): S = 7.
  const LrSchedule rounded = make(LrScheduleKind::kWsd, 2, 10, 0.25f);
  EXPECT_EQ(rounded.lr(6), kPeak);
  expect_lr(rounded, 7, double(kPeak) + (double(kMin) - kPeak) / 3);
  expect_lr(rounded, 9, kMin);
  // The decay would start at 5 but warmup lasts until step 8: S = W = 9, one decay step.
  const LrSchedule late = make(LrScheduleKind::kWsd, 9, 10, 0.5f);
  expect_lr(late, 8, kPeak);
  expect_lr(late, 9, kMin);
  // A fraction too small to round to one step still decays over the last step.
  const LrSchedule tiny = make(LrScheduleKind::kWsd, 0, 10, 0.01f);
  EXPECT_EQ(tiny.lr(8), kPeak);
  expect_lr(tiny, 9, kMin);
  // The whole run decaying: the line from the peak before step 0 down to m at the last step.
  const LrSchedule full = make(LrScheduleKind::kWsd, 0, 4, 1.0f);
  expect_lr(full, 0, double(kPeak) + (double(kMin) - kPeak) / 4);
  expect_lr(full, 3, kMin);
}

TEST(LrSchedule, ConstantKeySteps) {
  const LrSchedule s = make(LrScheduleKind::kConstant, 10, 101);
  for (int64_t step : {10, 55, 100}) EXPECT_EQ(s.lr(step), kPeak) << step;
  // min_lr is not used, so it is not checked against the peak.
  const LrSchedule ignores_min(
      {.peak_lr = 1e-3f, .min_lr = 1.0f, .warmup_steps = 0, .total_steps = 3, .kind = LrScheduleKind::kConstant});
  EXPECT_EQ(ignores_min.lr(2), 1e-3f);
}

TEST(LrSchedule, RejectsBadOptions) {
  const auto options = [](auto edit) {
    LrScheduleOptions o{.peak_lr = 1e-3f, .min_lr = 1e-4f, .warmup_steps = 2, .total_steps = 10,
                        .kind = LrScheduleKind::kWsd};
    edit(o);
    return o;
  };
  const auto err = [](const LrScheduleOptions& o) { return error_of([&] { LrSchedule s(o); }); };
  EXPECT_EQ(err(options([](auto& o) { o.warmup_steps = 20; })), "optim.warmup_steps (20) exceeds train.steps (10)");
  EXPECT_EQ(err(options([](auto& o) { o.warmup_steps = -1; })), "optim.warmup_steps (-1) must not be negative");
  EXPECT_EQ(err(options([](auto& o) { o.total_steps = 0; })), "train.steps (0) must be positive");
  EXPECT_EQ(err(options([](auto& o) { o.peak_lr = 0.0f; })), "optim.lr (0) must be positive and finite");
  EXPECT_EQ(err(options([](auto& o) { o.peak_lr = INFINITY; })), "optim.lr (inf) must be positive and finite");
  EXPECT_EQ(err(options([](auto& o) { o.min_lr = 2e-3f; })), "optim.min_lr (0.002) exceeds optim.lr (0.001)");
  EXPECT_EQ(err(options([](auto& o) { o.min_lr = -1e-5f; })), "optim.min_lr (-1e-05) must be non-negative and finite");
  EXPECT_EQ(err(options([](auto& o) { o.decay_fraction = 0.0f; })), "optim.decay_fraction (0) must be in (0, 1]");
  EXPECT_EQ(err(options([](auto& o) { o.decay_fraction = 1.5f; })), "optim.decay_fraction (1.5) must be in (0, 1]");
  // decay_fraction belongs to WSD only.
  EXPECT_EQ(err(options([](auto& o) {
              o.kind = LrScheduleKind::kCosine;
              o.decay_fraction = 0.0f;
            })),
            "<no error>");

  const LrSchedule s(options([](auto&) {}));
  EXPECT_EQ(error_of([&] { s.lr(10); }), "LrSchedule::lr: step 10 is outside [0, 10)");
  EXPECT_EQ(error_of([&] { s.lr(-1); }), "LrSchedule::lr: step -1 is outside [0, 10)");
}

}  // namespace
}  // namespace moeforge
