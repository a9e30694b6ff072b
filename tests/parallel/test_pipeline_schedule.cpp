// Tests parallel/pipeline_schedule: every schedule, simulated over all pipeline ranks with the
// executor's semantics (an action runs once its inputs exist; sends never block), completes
// without deadlock, runs each (chunk, micro-batch) forward and backward exactly once in
// dependency order, keeps the in-flight micro-batches within the schedule's bound, and — the
// point of interleaving — leaves a smaller bubble than 1F1B.
#include <gtest/gtest.h>

#include <map>
#include <tuple>
#include <vector>

#include "parallel/pipeline_schedule.h"
#include "tests/testing.h"

namespace moeforge {
namespace {

struct Simulation {
  bool completed = false;
  double makespan = 0.0;
  std::vector<double> busy;  // per rank
};

// Forward costs 1, backward 2 (per chunk). Model chunk g = c * pp + s.
Simulation simulate(PipelineSchedule schedule, int pp, int v, int m) {
  std::vector<std::vector<PipelineAction>> plan;
  for (int s = 0; s < pp; ++s) plan.push_back(pipeline_actions(schedule, pp, v, m, s));
  const int G = pp * v;
  std::map<std::tuple<bool, int, int>, double> done;  // (forward, g, mb) -> finish time
  std::vector<size_t> next(pp, 0);
  std::vector<double> free_at(pp, 0.0);
  Simulation sim;
  sim.busy.assign(pp, 0.0);
  double now = 0.0;
  size_t remaining = 0;
  for (const auto& p : plan) remaining += p.size();
  while (remaining > 0) {
    bool started = false;
    for (int s = 0; s < pp; ++s) {
      if (next[s] == plan[s].size() || free_at[s] > now) continue;
      const PipelineAction a = plan[s][next[s]];
      const int g = a.chunk * pp + s;
      auto ready = [&](bool f, int gg) {
        const auto it = done.find({f, gg, a.micro_batch});
        return it != done.end() && it->second <= now;
      };
      const bool ok = a.forward ? (g == 0 || ready(true, g - 1)) : (ready(true, g) && (g == G - 1 || ready(false, g + 1)));
      if (!ok) continue;
      const double cost = a.forward ? 1.0 : 2.0;
      free_at[s] = now + cost;
      sim.busy[s] += cost;
      done[{a.forward, g, a.micro_batch}] = now + cost;
      ++next[s];
      --remaining;
      started = true;
    }
    if (remaining == 0) break;
    // Advance to the next finish time after now.
    double t = 1e300;
    for (const auto& [key, finish] : done)
      if (finish > now) t = std::min(t, finish);
    if (t == 1e300) {
      if (!started) return sim;  // nothing running, nothing can start: deadlock
      continue;
    }
    now = t;
  }
  sim.completed = true;
  for (const auto& [key, finish] : done) sim.makespan = std::max(sim.makespan, finish);
  return sim;
}

double bubble(const Simulation& sim, int rank) { return 1.0 - sim.busy[rank] / sim.makespan; }

TEST(PipelineSchedule, EveryScheduleCompletesAndRunsEachUnitOnce) {
  for (int pp : {1, 2, 3, 4})
    for (int m : {1, 2, 4, 5, 8, 12})
      for (PipelineSchedule sched : {PipelineSchedule::kGPipe, PipelineSchedule::k1F1B, PipelineSchedule::kInterleaved})
        for (int v : {1, 2, 3}) {
          if ((sched == PipelineSchedule::kInterleaved) != (v > 1)) continue;
          if (sched == PipelineSchedule::kInterleaved && (pp == 1 || m % pp != 0)) continue;
          const std::string what = schedule_name(sched) + " pp " + std::to_string(pp) + " v " + std::to_string(v) +
                                   " m " + std::to_string(m);
          for (int s = 0; s < pp; ++s) {
            const std::vector<PipelineAction> acts = pipeline_actions(sched, pp, v, m, s);
            ASSERT_EQ(acts.size(), static_cast<size_t>(2 * m * v)) << what;
            std::map<std::pair<int, int>, int> state;  // 0 none, 1 forward done, 2 backward done
            for (const PipelineAction& a : acts) {
              int& st = state[{a.chunk, a.micro_batch}];
              ASSERT_EQ(st, a.forward ? 0 : 1) << what << " rank " << s << ": unit out of order";
              st = a.forward ? 1 : 2;
            }
            for (const auto& [key, st] : state) EXPECT_EQ(st, 2) << what;
          }
          EXPECT_TRUE(simulate(sched, pp, v, m).completed) << what << " deadlocks";
        }
}

TEST(PipelineSchedule, InFlightMicroBatchesStayWithinTheBound) {
  for (int pp : {2, 4})
    for (int m : {4, 8, 16}) {
      for (int s = 0; s < pp; ++s) {
        EXPECT_EQ(max_in_flight(pipeline_actions(PipelineSchedule::k1F1B, pp, 1, m, s)), std::min(pp - s, m))
            << "1f1b pp " << pp << " m " << m << " rank " << s;
        EXPECT_EQ(max_in_flight(pipeline_actions(PipelineSchedule::kGPipe, pp, 1, m, s)), m);
        for (int v : {2, 4}) {
          const int bound = std::min((pp - s - 1) * 2 + (v - 1) * pp + 1, m * v);
          EXPECT_EQ(max_in_flight(pipeline_actions(PipelineSchedule::kInterleaved, pp, v, m, s)), bound)
              << "interleaved pp " << pp << " v " << v << " m " << m << " rank " << s;
        }
      }
      // The promise of 1F1B: the first stage holds at most pp micro-batches.
      EXPECT_LE(max_in_flight(pipeline_actions(PipelineSchedule::k1F1B, pp, 1, m, 0)), pp);
    }
}

TEST(PipelineSchedule, BubbleMatchesTheoryAndInterleavingShrinksIt) {
  // Equal stages: 1F1B's bubble is (pp - 1) / (m + pp - 1) of the step.
  for (auto [pp, m] : {std::pair{2, 4}, {4, 8}, {4, 16}}) {
    const Simulation one = simulate(PipelineSchedule::k1F1B, pp, 1, m);
    ASSERT_TRUE(one.completed);
    EXPECT_NEAR(bubble(one, 0), static_cast<double>(pp - 1) / (m + pp - 1), 1e-9) << "pp " << pp << " m " << m;
    const Simulation gpipe = simulate(PipelineSchedule::kGPipe, pp, 1, m);
    EXPECT_NEAR(bubble(gpipe, 0), bubble(one, 0), 1e-9) << "same bubble, more memory";
    // Interleaving v chunks per rank (each 1/v of the work) cuts the bubble by about v.
    const Simulation inter = simulate(PipelineSchedule::kInterleaved, pp, 2, m);
    ASSERT_TRUE(inter.completed);
    EXPECT_LT(bubble(inter, 0), bubble(one, 0) * 0.75) << "pp " << pp << " m " << m;
  }
}

TEST(PipelineSchedule, InvalidCombinationsAreNamed) {
  EXPECT_EQ(testing::error_of([] { pipeline_actions(PipelineSchedule::kInterleaved, 4, 2, 6, 0); }),
            "pipeline: the interleaved schedule needs the micro-batches per step and DP rank (6) to be a multiple of "
            "parallel.pp = 4");
  EXPECT_EQ(testing::error_of([] { pipeline_actions(PipelineSchedule::k1F1B, 2, 2, 4, 0); }),
            "parallel.virtual_stages = 2 needs the interleaved schedule (parallel.pp_schedule: INTERLEAVED_1F1B)");
}

}  // namespace
}  // namespace moeforge
