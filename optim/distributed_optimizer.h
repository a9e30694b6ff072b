// Data-parallel training's optimizer side: turning each rank's gradients into the gradient of
// the global batch, the global grad norm and clipping, and the AdamW step — with the optimizer
// state replicated (zero_stage 0) or sharded over DP (ZeRO-1).
//
// Which ranks hold partial sums of a gradient (parallel/process_grid.h for the groups):
//  - Parameters split over TP (q/k/v/o, embedding, LM head) are complete on each TP rank for
//    their shard; DP replicas hold the same shard for different data: average over DP.
//  - With tp > 1, every other parameter (norms, router, experts, shared experts) is whole on each
//    TP rank but saw only that rank's token rows (sequence parallelism): sum over TP, then
//    average over DP — one all-reduce over the stage group (TP x DP), scaled by 1/dp.
//
// zero_stage 0: bucketed all-reduces (buckets of about bucket_bytes) per group; every rank then
// updates every parameter with its own AdamW state.
//
// zero_stage 1 (ZeRO-1): TP partial sums are all-reduced over TP first; then all local
// parameters, concatenated in registry order (padded to a multiple of dp), form one flat vector
// cut into dp equal chunks. The gradients are reduce-scattered so DP rank r receives the
// averaged chunk r, AdamW keeps fp32 state only for the elements of its chunk (AdamW's owned
// ranges: state stays addressed by parameter name and element range), updates them, and the
// parameters are all-gathered back. The result equals stage 0 up to summation order.
//
// Grad norm counts every unique element once: TP-split parameters on every TP rank, TP-whole ones
// only on TP rank 0; with ZeRO-1 each DP rank counts its chunk; the partial sums of squares are
// then added over the groups that hold different elements.
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
  // One AdamW update with learning rate lr (ZeRO-1: of this rank's chunk, then all-gathered).
  void step(float lr);

  AdamW& adamw() { return *adamw_; }
  int zero_stage() const { return zero_stage_; }

 private:
  // True when this parameter's gradient is a partial sum over the TP group.
  bool tp_partial(const Param& p) const;
  // All-reduces (sum) the gradients of `params` over `group` in buckets, then scales by `scale`.
  void bucketed_all_reduce(const std::vector<Param*>& params, Comm& group, float scale);
  ElementRange owned(const Param& p) const;
  // The gradient elements this rank updates: all of them, or (ZeRO-1) a 1-D view of its range.
  Tensor owned_grad(const Param& p) const;

  ParamRegistry& registry_;
  ProcessGrid grid_;
  int zero_stage_;
  int64_t bucket_bytes_;
  std::vector<Param*> tp_split_, tp_whole_;  // registry order
  // ZeRO-1 flat layout: offset of each parameter (registry order) in the flat vector, the padded
  // length and this rank's chunk [chunk_begin_, chunk_begin_ + chunk_).
  std::vector<int64_t> flat_offset_;
  std::unordered_map<const Param*, size_t> index_;  // registry position of each parameter
  int64_t flat_size_ = 0, chunk_ = 0, chunk_begin_ = 0;
  std::unique_ptr<AdamW> adamw_;
};

}  // namespace moeforge
