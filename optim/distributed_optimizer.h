// Data-parallel training's optimizer side: turning each rank's gradients into the gradient of
// the global batch, the global grad norm and clipping, and the AdamW step — with the optimizer
// state replicated (zero_stage 0) or sharded (ZeRO-1).
//
// Which ranks hold partial sums of a gradient (parallel/process_grid.h for the groups):
//  - Dense parameters split over TP (q/k/v/o, embedding, LM head) are complete on each TP rank
//    for their shard; DP replicas hold the same shard for different data: average over DP.
//  - With tp > 1, the other dense parameters (norms, router, shared experts) are whole on each
//    TP rank but saw only that rank's token rows (sequence parallelism): sum over TP, then
//    average over DP — one all-reduce over the stage group (TP x DP), scaled by 1/dp.
//  - Expert parameters (spec.expert): rank r of an EP group owns experts/ep whole experts and its
//    gradient already sums the token copies every member of its EP group sent it. The members of
//    its expert-DP group own the same experts for the other EP groups of the stage, so the sum
//    over expert-DP is the sum over the whole stage: all-reduce over expert-DP, scaled by 1/dp.
//    (With ep = 1, expert-DP is the stage and this is the TP-whole rule.)
//  - Non-trainable entries (the expert bias) take no part.
//  - Pipeline parallelism: each stage reduces its own parameters; tied embeddings (a copy on the
//    first and on the last stage) first sum their gradients over grid.embed().
//
// zero_stage 0: bucketed all-reduces (buckets of about bucket_bytes) per group; every rank then
// updates every parameter with its own AdamW state.
//
// zero_stage 1 (ZeRO-1): two flat vectors, each cut into equal chunks over its group. Dense
// parameters, concatenated in registry order (padded to a multiple of dp), are split over DP
// (TP-whole partial sums are first all-reduced over TP); expert parameters are split over
// expert-DP. The gradients are reduce-scattered so each rank receives its averaged chunk, AdamW
// keeps fp32 state only for the elements of its chunks (AdamW's owned ranges: state stays
// addressed by parameter name and element range), updates them, and the parameters are
// all-gathered back. The result equals stage 0 up to summation order.
//
// Grad norm counts every unique element once: each rank adds the squares of the elements it is
// the designated holder of (stage 0: rank 0 of the group the gradient is replicated over; ZeRO-1:
// its own chunks, TP-whole ones on TP rank 0 only; never a tied replica); the sums are then added
// over the stage and over the pipeline stages.
// Devices: gradients, flat buffers and buckets live on the registry's device and move over the
// grid's Comms (NCCL for CUDA tensors); only the grad norm's partial sums of squares come to the
// host (a double per rank, summed over the groups as host tensors).
#pragma once

#include <cstdint>
#include <memory>
#include <unordered_map>
#include <vector>

#include "models/param_registry.h"
#include "optim/adamw.h"
#include "parallel/process_grid.h"

namespace moeforge {

class DistributedOptimizer {
 public:
  DistributedOptimizer(ParamRegistry& registry, const ProcessGrid& grid, AdamWOptions options, int zero_stage,
                       int64_t bucket_bytes = int64_t{16} << 20);

  // After backward (gradients summed over this rank's micro-batches): every gradient becomes the
  // gradient of the global batch's mean loss (ZeRO-1: on this rank's chunk).
  void reduce_gradients();
  // The global gradient norm; scales the gradients by max_norm / (norm + 1e-6) when it exceeds
  // max_norm > 0. Returns the norm before clipping (inf/NaN gradients are left as they are).
  double clip_grad_norm(double max_norm);
  // One AdamW update with learning rate lr (ZeRO-1: of this rank's chunks, then all-gathered),
  // then the registry's bf16 compute copies refreshed from the new masters.
  void step(float lr);

  AdamW& adamw() { return *adamw_; }
  int zero_stage() const { return zero_stage_; }
  // The group ZeRO-1 splits this parameter's AdamW state over (DP, or expert-DP for experts);
  // AdamW::owned_range gives this rank's part.
  Comm& state_group(const Param& p) const;

 private:
  // One ZeRO-1 flat vector: the parameters of one group, in registry order, padded to a multiple
  // of the group size; this rank owns [begin, begin + chunk).
  struct Flat {
    Comm* group = nullptr;
    std::vector<Param*> params;
    std::vector<int64_t> offset;  // of each parameter in the flat vector
    int64_t size = 0, chunk = 0, begin = 0;
    void build(Comm& g);
    void reduce_scatter(float scale) const;  // gradients -> this rank's averaged chunk
    void all_gather() const;                 // this rank's updated values -> everyone's
  };

  // True when this parameter's gradient is a partial sum over the TP group (TP-whole dense).
  bool tp_partial(const Param& p) const;
  // All-reduces (sum) the gradients of `params` over `group` in buckets, then scales by `scale`.
  void bucketed_all_reduce(const std::vector<Param*>& params, Comm& group, float scale);
  ElementRange owned(const Param& p) const;
  // The gradient elements this rank updates: all of them, or (ZeRO-1) a 1-D view of its range.
  Tensor owned_grad(const Param& p) const;
  // Whether this rank adds p's (owned) gradient to the grad norm.
  bool counts_in_norm(const Param& p) const;

  ParamRegistry& registry_;
  ProcessGrid grid_;
  int zero_stage_;
  int64_t bucket_bytes_;
  std::vector<Param*> tp_split_, tp_whole_, experts_;  // trainable, registry order
  std::vector<Param*> tied_;                          // tied embedding copies (pipeline ends)
  Flat dense_flat_, expert_flat_;                     // ZeRO-1
  std::unordered_map<const Param*, std::pair<const Flat*, size_t>> flat_index_;
  std::unique_ptr<AdamW> adamw_;
};

}  // namespace moeforge
