// Saving a sharded checkpoint: `<dir>/step_00000010/` with manifest.pb and one HDF5 shard file
// per writing rank (rank_00003.h5, by world rank).
//
// A save has three phases:
//  1. snapshot (collective): every rank collects the blocks it writes (checkpoint/placement.h):
//     parameters and, for trainable ones, the AdamW moments in model coordinates; an async save
//     copies them into host buffers, a synchronous one writes straight from the live tensors. With ZeRO-1 a rank holds only its flat range of the moments; the ranges of a
//     parameter's state group are gathered to the writer (an all-reduce of zero-filled local
//     blocks over the group, exact because every element has exactly one non-zero contributor
//     and moments are never -0). Padding rows are cut off.
//  2. write (no communication; the background thread with async saves): the shard file goes
//     into `<dir>/.tmp_step_00000010/` and is closed; then it is fsynced while a second thread
//     hashes it (SHA-256) from the page cache, so the digest costs no time beyond the fsync.
//  3. commit (collective over the world): the ranks' records are gathered on rank 0, which
//     writes manifest.pb, fsyncs it and the directory, renames the directory to
//     `step_00000010`, fsyncs `<dir>`, replaces `<dir>/latest` atomically (temp file + rename)
//     and deletes all but the newest keep_last step directories and any stale `.tmp_step_*`.
// A checkpoint is therefore either complete under its final name or ignored: a crash before the
// rename leaves only a `.tmp_step_*` directory, and `latest` always names a complete step.
//
// A failed save (I/O error on any rank) is reported by the outcome, its temporary directory is
// removed, and training continues.
//
// Test pause point: with the environment variable MOEFORGE_TEST_PAUSE_IN_SAVE=N, a rank that has
// written its shard file of step N prints "moeforge: test pause in save of step N (pid P)" to
// stderr and sleeps until it is killed (the fault tests SIGKILL it there, mid-save).
//
// Threads: the Saver is used from the training thread. At most one save is in flight; the next
// save(), finish() and the destructor wait for it. The background thread is the only user of
// HDF5 while it runs.
#pragma once

#include <cstdint>
#include <future>
#include <memory>
#include <string>
#include <vector>

#include "checkpoint/checkpoint.pb.h"
#include "checkpoint/placement.h"
#include "configs/moeforge.pb.h"
#include "optim/distributed_optimizer.h"

namespace moeforge::checkpoint {

// What a checkpoint records besides the tensors.
struct RunState {
  int64_t step = 0;            // optimizer steps completed
  uint64_t data_position = 0;  // next global sample index
  config::RunConfig config;
};

// One rank's blocks: copies in host memory (async saves, which write while training goes on)
// or views of the live tensors (synchronous saves, which write before training resumes).
struct Snapshot {
  struct Block {
    std::string name;
    TensorKind kind = PARAM;
    std::vector<int64_t> global_shape;
    Box box;
    const float* view = nullptr;  // the live numbers, when not copied
    std::vector<float> copy;
    const float* values() const { return view ? view : copy.data(); }  // row-major box.shape
  };
  int world_rank = 0;
  std::vector<Block> blocks;
  std::vector<Tensor> gathered;  // ZeRO-1 moments gathered to this writer (views point into them)
};

// Phase 1 (collective over the state groups under ZeRO-1). copy: copy the blocks (else the
// snapshot views the registry and optimizer, which must not change until it is written).
// `recycle`: the copies of an earlier snapshot, reused in order as the new copies' buffers, so a
// steady run of async saves copies into memory it already holds instead of faulting in fresh
// pages on the training thread.
Snapshot snapshot(ParamRegistry& registry, DistributedOptimizer& optimizer, const ProcessGrid& grid, bool copy,
                  std::vector<std::vector<float>>* recycle = nullptr);

// Phase 2: writes snapshot's blocks as `<tmp_dir>/rank_NNNNN.h5` (no file when it has no
// blocks). Errors are returned in the record, not thrown.
ShardRecord write_shard(const Snapshot& snapshot, const std::string& tmp_dir, int64_t step);

struct SaveOutcome {
  bool ok = false;
  int64_t step = 0;
  std::string path;   // the step directory (when ok)
  std::string error;  // why it failed (rank 0 has the full text)
  double seconds = 0.0;  // from the snapshot to the commit
};

// The directory name of a step: "step_00000010".
std::string step_dir_name(int64_t step);

class Saver {
 public:
  // dir: the checkpoint root (created when missing). keep_last >= 1.
  Saver(std::string dir, int keep_last, bool async, const ProcessGrid& grid);
  ~Saver();
  Saver(const Saver&) = delete;
  Saver& operator=(const Saver&) = delete;

  // Collective: starts a save of the current state. Synchronous saves return their outcome;
  // asynchronous ones return nothing until poll()/finish() commits them.
  std::optional<SaveOutcome> save(const RunState& state, ParamRegistry& registry, DistributedOptimizer& optimizer);
  // Collective, once per step: commits a background save once every rank's write has finished.
  std::optional<SaveOutcome> poll();
  // Collective: waits for a pending save and commits it.
  std::optional<SaveOutcome> finish();
  bool pending() const { return pending_ != nullptr; }
  // Async saves: allocates (and touches) the host buffers of the snapshots ahead, sized for the
  // registry's blocks, so the first save copies into memory already faulted in instead of
  // stalling the step on page faults. Returns the bytes reserved (0 for synchronous saves).
  int64_t reserve(ParamRegistry& registry);
  const std::string& dir() const { return dir_; }

 private:
  struct Pending;
  SaveOutcome commit();

  std::string dir_;
  int keep_last_;
  bool async_;
  ProcessGrid grid_;
  std::unique_ptr<Pending> pending_;
  std::vector<std::vector<float>> spare_;  // the last committed async snapshot's buffers
};

}  // namespace moeforge::checkpoint
