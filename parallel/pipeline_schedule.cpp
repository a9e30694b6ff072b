#include "parallel/pipeline_schedule.h"

#include <algorithm>

#include "runtime/error.h"

namespace moeforge {

std::string schedule_name(PipelineSchedule s) {
  switch (s) {
    case PipelineSchedule::kGPipe: return "gpipe";
    case PipelineSchedule::k1F1B: return "1f1b";
    case PipelineSchedule::kInterleaved: return "interleaved-1f1b";
  }
  return "?";
}

namespace {

// Megatron's interleaved order: unit k of a direction -> (virtual chunk, micro-batch).
PipelineAction interleaved_unit(bool forward, int k, int pp, int v) {
  const int in_group = k % (pp * v);
  int chunk = in_group / pp;
  if (!forward) chunk = v - 1 - chunk;
  const int mb = (k / (pp * v)) * pp + k % pp;
  return {forward, chunk, mb};
}

}  // namespace

std::vector<PipelineAction> pipeline_actions(PipelineSchedule schedule, int pp, int v, int m, int rank) {
  MOE_CHECK(pp >= 1 && rank >= 0 && rank < pp, "pipeline: rank {} is outside [0, {})", rank, pp);
  MOE_CHECK(m >= 1, "pipeline: {} micro-batches; need at least one", m);
  MOE_CHECK(v >= 1, "parallel.virtual_stages must be >= 1, got {}", v);
  MOE_CHECK(schedule == PipelineSchedule::kInterleaved || v == 1,
            "parallel.virtual_stages = {} needs the interleaved schedule (parallel.pp_schedule: INTERLEAVED_1F1B)", v);
  std::vector<PipelineAction> out;
  out.reserve(static_cast<size_t>(2 * m * v));
  switch (schedule) {
    case PipelineSchedule::kGPipe:
      for (int mb = 0; mb < m; ++mb) out.push_back({true, 0, mb});
      for (int mb = 0; mb < m; ++mb) out.push_back({false, 0, mb});
      break;
    case PipelineSchedule::k1F1B: {
      const int warmup = std::min(pp - rank - 1, m);
      int f = 0, b = 0;
      for (; f < warmup; ++f) out.push_back({true, 0, f});
      while (f < m) {
        out.push_back({true, 0, f++});
        out.push_back({false, 0, b++});
      }
      while (b < m) out.push_back({false, 0, b++});
      break;
    }
    case PipelineSchedule::kInterleaved: {
      MOE_CHECK(pp > 1, "pipeline: the interleaved schedule needs parallel.pp > 1");
      MOE_CHECK(m % pp == 0,
                "pipeline: the interleaved schedule needs the micro-batches per step and DP rank ({}) to be a "
                "multiple of parallel.pp = {}",
                m, pp);
      const int total = m * v;
      const int warmup = std::min((pp - rank - 1) * 2 + (v - 1) * pp, total);
      int f = 0, b = 0;
      for (; f < warmup; ++f) out.push_back(interleaved_unit(true, f, pp, v));
      while (f < total) {
        out.push_back(interleaved_unit(true, f++, pp, v));
        out.push_back(interleaved_unit(false, b++, pp, v));
      }
      while (b < total) out.push_back(interleaved_unit(false, b++, pp, v));
      break;
    }
  }
  return out;
}

int max_in_flight(const std::vector<PipelineAction>& actions) {
  int live = 0, most = 0;
  for (const PipelineAction& a : actions) {
    live += a.forward ? 1 : -1;
    most = std::max(most, live);
  }
  return most;
}

}  // namespace moeforge
