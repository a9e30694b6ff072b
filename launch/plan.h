// The planner's model of one training step (`moeforge plan`, docs/planning.md): for a layout of
// a run, the memory each rank holds, the bytes each rank puts into each communication group, and
// the step time they imply on a cluster (launch/cluster.h).
//
// The formulas follow the code they describe, so moeforge's own measurements check them exactly
// (tests/plan/):
//  - parameters, gradients, optimizer state: the registrations of MoeTransformer and its blocks
//    (models/transformer.cpp, attention.cpp, moe_block.cpp, dense_block.cpp) and the ZeRO-1 flat
//    vectors of optim/distributed_optimizer.cpp;
//  - activations: the tensors MoeTransformer::activation_bytes() counts for one (chunk,
//    micro-batch) unit, held in flight as parallel/pipeline_schedule.h orders the units;
//  - bytes: what Comm::bytes_sent() counts (parallel/comm.h) for every collective of one
//    Trainer::step: sequence-parallel gathers/scatters, router counts over TP, the token
//    dispatcher's count exchange and all-to-alls (models/token_dispatcher.cpp), pipeline sends,
//    DistributedOptimizer's reductions, grad-norm and loss/load all-reduces.
//
// Expert traffic depends on routing. ExpertRows carries, per MoE layer and micro-batch, the token
// copies a rank sends to / receives from other EP members; the planner assumes uniform routing,
// tests pass the rows of a forced routing.
//
// Dropless routing is assumed for the byte and memory counts (capacity mode drops copies and
// moves fewer rows).
#pragma once

#include <cstdint>

#include "launch/cluster.h"
#include "models/model_config.h"
#include "models/pipeline_split.h"
#include "parallel/pipeline_schedule.h"

namespace moeforge {

struct PlanLayout {
  int tp = 1, pp = 1, vstages = 1, ep = 1, dp = 1;
  int64_t micro_batch = 1;
  bool recompute = false;
  int zero_stage = 0;
  PipelineSchedule schedule = PipelineSchedule::k1F1B;  // layers split evenly (models/pipeline_split.h)

  int world() const { return tp * pp * dp; }
};

// The tokens of one optimizer step.
struct StepShape {
  int64_t global_batch = 1;  // sequences
  int64_t seq_len = 1;       // T
};

// Bytes per element as a backend stores them. CPU: everything fp32, the parameters are the
// master weights, AdamW keeps m and v. GPU: bf16 parameters and activations, fp32 gradients,
// fp32 master weights + m + v.
struct Precision {
  int64_t param = 4, grad = 4, optimizer = 8, act = 4;
  static Precision cpu() { return {4, 4, 8, 4}; }
  static Precision gpu_bf16() { return {2, 4, 12, 2}; }
};

// A rank's place in the layout (parallel/process_grid.h: TP fastest, then DP, then PP).
struct RankCoord {
  int tp_rank = 0, dp_rank = 0, pp_rank = 0;
};

// One MoE layer's forward of one micro-batch on one rank, in token-copy rows: sent to other EP
// members, received from other EP members, and received in all (R, this rank's expert rows,
// including its own copies).
struct ExpertRows {
  double to_others = 0, from_others = 0, received = 0;
};
// Uniform routing: each of the M = Nl * K copies lands on any EP member with probability 1/ep.
ExpertRows uniform_expert_rows(const ModelConfig& cfg, const PlanLayout& layout, const StepShape& shape);

// Local elements of one rank's parameters, by how DistributedOptimizer reduces them.
struct RankParams {
  int64_t tp_split = 0;  // dense, split over TP or tp = 1: reduce over DP
  int64_t tp_whole = 0;  // dense, whole on each TP rank (tp > 1): reduce over TP x DP
  int64_t expert = 0;    // routed experts: reduce over expert-DP
  int64_t frozen = 0;    // non-trainable (expert bias)
  int64_t tied = 0;      // tied embedding copies at the pipeline ends (part of tp_split)
  int64_t total() const { return tp_split + tp_whole + expert + frozen; }
  int64_t trainable() const { return tp_split + tp_whole + expert; }
};
RankParams rank_params(const ModelConfig& cfg, const PlanLayout& layout, const RankCoord& rank);

// Elements of AdamW state per moment on a rank (all trainable, or the ZeRO-1 owned chunks).
int64_t optimizer_elements(const ModelConfig& cfg, const PlanLayout& layout, const RankCoord& rank);

// Bytes of one (chunk c, micro-batch) unit of kept activations on rank `rank`, as
// MoeTransformer::activation_bytes() counts them.
double unit_activation_bytes(const ModelConfig& cfg, const PlanLayout& layout, const StepShape& shape,
                             const RankCoord& rank, int chunk, const Precision& prec, const ExpertRows& rows);
// The most activation bytes the rank keeps after any forward of the step's schedule (what
// Trainer::step reports as peak_activation_bytes).
double peak_activation_bytes(const ModelConfig& cfg, const PlanLayout& layout, const StepShape& shape,
                             const RankCoord& rank, const Precision& prec, const ExpertRows& rows);

// Per group, one rank's Comm::bytes_sent() over one step, with the calls behind them.
// `wire`: the bytes the rank moves over its link under ring algorithms (all-reduce 2(g-1)/g of
// its input, reduce-scatter (g-1)/g, all-gather g-1 times its input, all-to-all and sends once).
struct GroupTraffic {
  double bytes = 0;
  double calls = 0;
  double wire = 0;
};
struct StepTraffic {
  // Inside the pipeline (every micro-batch): TP sequence parallelism, EP dispatch, PP sends.
  GroupTraffic tp, ep, pp;
  // After the pipeline: gradient reductions, grad norm, loss and load all-reduces.
  GroupTraffic tp_opt, dp, stage, pp_opt, expert_dp, embed, world;
  // What Comm::bytes_sent() of each ProcessGrid group reads after the step.
  double tp_total() const { return tp.bytes + tp_opt.bytes; }
  double pp_total() const { return pp.bytes + pp_opt.bytes; }
};
StepTraffic step_traffic(const ModelConfig& cfg, const PlanLayout& layout, const StepShape& shape,
                         const RankCoord& rank, const Precision& prec, const ExpertRows& rows);

// Forward FLOPs of one micro-batch through chunk c on this rank (GEMMs and attention; backward
// is twice this, recomputation adds one forward of the layers).
double chunk_forward_flops(const ModelConfig& cfg, const PlanLayout& layout, const StepShape& shape,
                           const RankCoord& rank, int chunk, const ExpertRows& rows);

}  // namespace moeforge
