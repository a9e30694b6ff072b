// Pipeline schedules (DESIGN.md, Parallelism: PP): the order in which one pipeline rank runs the
// forward and backward passes of its model chunks over a step's micro-batches.
//
// The model's layers are cut into G = pp * v contiguous model chunks; pipeline rank s holds the
// v chunks g = c * pp + s, c = 0..v-1 (virtual stages, Megatron's interleaving), so activations
// travel s -> s+1 -> ... -> pp-1 -> 0 -> 1 ... through the chunks. Dependencies: forward (g, mb)
// needs forward (g-1, mb); backward (g, mb) needs forward (g, mb) and backward (g+1, mb).
//
//   kGPipe        all forwards (micro-batch order), then all backwards: m micro-batches in flight.
//   k1F1B         (PipeDream-Flush) pp - s - 1 warm-up forwards, then alternate one forward and
//                 one backward, then the remaining backwards: at most pp - s in flight on rank s.
//   kInterleaved  1F1B over virtual chunks (Megatron-LM): forwards walk the chunks in groups of
//                 pp micro-batches (chunk 0 for micro-batches 0..pp-1, chunk 1 for the same, ...,
//                 then the next pp micro-batches), backwards likewise from the last chunk; warm-up
//                 of (pp - s - 1) * 2 + (v - 1) * pp forward units. Needs m divisible by pp.
//
// The executor (launch/trainer) receives an action's input before running it and sends its output
// without waiting (non-blocking sends, matched by tag), so any order that respects the
// dependencies on every rank completes; tests/parallel/test_pipeline_schedule.cpp simulates all
// ranks to check that, the in-flight bounds and the bubble.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace moeforge {

enum class PipelineSchedule : uint8_t { kGPipe, k1F1B, kInterleaved };

struct PipelineAction {
  bool forward = true;
  int chunk = 0;        // virtual chunk c on this rank (model chunk c * pp + rank)
  int micro_batch = 0;
  bool operator==(const PipelineAction&) const = default;
};

// The actions of pipeline rank `rank` of `pp` for `micro_batches` micro-batches, with `virtual_stages`
// chunks per rank (1 unless kInterleaved). Throws moeforge::Error on an invalid combination.
std::vector<PipelineAction> pipeline_actions(PipelineSchedule schedule, int pp, int virtual_stages,
                                             int micro_batches, int rank);

// The most (chunk, micro-batch) forwards whose backward has not yet run, over the actions.
int max_in_flight(const std::vector<PipelineAction>& actions);

// "1f1b", "gpipe", "interleaved-1f1b"
std::string schedule_name(PipelineSchedule s);

}  // namespace moeforge
