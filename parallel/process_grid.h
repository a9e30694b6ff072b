// ProcessGrid: the rank layout of a run and its communication groups, passed around as one
// value (copies share the groups; nothing is global).
//
// World = PP × DP × TP with TP fastest: world rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank.
//   tp         the tp ranks of one (pp, dp) position            size tp
//   dp         the dp ranks of one (pp, tp) position            size dp
//   pp         the pp ranks of one (dp, tp) position            size pp
//   stage      all ranks of one pipeline stage, in order dp_rank * tp + tp_rank   size tp * dp
//   ep         expert parallelism by "parallel folding": a stage's ranks, in that order, cut into
//              consecutive groups of ep                          size ep
//   expert_dp  the ranks of a stage with the same position inside their ep group
//                                                                size tp * dp / ep
//   embed      the first and the last stage's ranks of one (dp, tp) position: they hold the two
//              copies of tied embeddings                         size 2 (1 when pp = 1 or in a
//                                                                middle stage)
// Group ranks follow the world order. A group of one member is a SelfComm (no MPI traffic, no
// deadline); larger ones are split from MPI_COMM_WORLD: MpiComms when the run's device is the CPU,
// NcclComms (parallel/nccl_comm.h: NCCL for CUDA tensors, the group's MpiComm for host tensors)
// when it is a CUDA device.
//
// The run's device (train.device): every rank computes on one device, the CPU or its local GPU
// (launch/trainer.h: run_device). The grid carries it, so the model, its parameters and the
// optimizer state are allocated where the grid's communicators move data.
//
// The grid's Comms must be destroyed before the MpiRuntime (MPI_Finalize).
#pragma once

#include <memory>

#include "parallel/comm.h"
#include "runtime/dtype.h"

namespace moeforge {

class MpiRuntime;

struct ParallelSizes {
  int tp = 1, pp = 1, dp = 1, ep = 1;
};

// Throws unless every size is >= 1, tp * pp * dp == world_size and ep divides tp * dp; the
// message names the sizes (same on every rank, so every rank fails alike).
void check_parallel_sizes(const ParallelSizes& sizes, int world_size);

class ProcessGrid {
 public:
  // Collective over MPI_COMM_WORLD: checks the sizes against the world size and builds the groups
  // with MPI_Comm_split. collective_timeout_s: the deadline of every blocking call, > 0. device:
  // this rank's compute device (NcclComm groups for a CUDA device; an Error in a build without
  // CUDA).
  static ProcessGrid create(const MpiRuntime& mpi, const ParallelSizes& sizes, double collective_timeout_s,
                            Device device = Device::cpu());
  // World size 1 without MPI: every group is a SelfComm (unit tests of model code).
  static ProcessGrid single(Device device = Device::cpu());

  // The device this rank computes on: parameters, activations and optimizer state live there.
  Device device() const { return device_; }

  Comm& world() const { return *world_; }
  Comm& tp() const { return *tp_; }
  Comm& dp() const { return *dp_; }
  Comm& pp() const { return *pp_; }
  Comm& stage() const { return *stage_; }
  Comm& ep() const { return *ep_; }
  Comm& expert_dp() const { return *expert_dp_; }
  Comm& embed() const { return *embed_; }

  const ParallelSizes& sizes() const { return sizes_; }
  int world_rank() const { return world_->rank(); }
  int world_size() const { return world_->size(); }
  int tp_rank() const { return tp_->rank(); }
  int dp_rank() const { return dp_->rank(); }
  int pp_rank() const { return pp_->rank(); }
  int ep_rank() const { return ep_->rank(); }
  int expert_dp_rank() const { return expert_dp_->rank(); }

 private:
  ProcessGrid() = default;

  ParallelSizes sizes_;
  Device device_;
  std::shared_ptr<Comm> world_, tp_, dp_, pp_, stage_, ep_, expert_dp_, embed_;
};

}  // namespace moeforge
