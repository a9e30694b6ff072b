// Checkpointing in `moeforge train`: the glue between a Trainer and checkpoint/.
//
//  - Resume: `--resume auto` loads <checkpoint.dir>/latest when there is one and starts fresh
//    otherwise; `--resume PATH` loads that step directory (or the `latest` of that checkpoint
//    directory) and fails when it cannot. Parameters, AdamW state, the step and the data
//    position continue exactly; the LR schedule follows from the step.
//  - Saves: every checkpoint.every steps and after the last step (checkpoint.async_save writes
//    on a background thread; its commit happens at a later step boundary). A failed save is
//    reported on rank 0's stderr and training continues.
//  - Preemption: SIGTERM and SIGUSR1 only set a flag. After each step the flag is combined over
//    all ranks (a max all-reduce), so every rank stops after the same step; the job saves that
//    step, waits for the save and exits 0.
//
// The signal flag is the one process-wide variable here: a signal handler can reach nothing else.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "checkpoint/save.h"
#include "launch/trainer.h"

namespace moeforge {

class Checkpointing {
 public:
  // Installs the SIGTERM/SIGUSR1 handlers.
  Checkpointing(const config::RunConfig& run, const ProcessGrid& grid);

  // resume: "" (fresh), "auto" or a path. Loads into the trainer; rank 0 says what it did.
  void resume(Trainer& trainer, const std::string& resume);
  // With async saves: reserves the snapshot buffers before training starts (see Saver::reserve).
  void prepare(Trainer& trainer);
  // The trainer's step hook: saves when due; true (stop) after a signal, once the step is saved.
  bool after_step(Trainer& trainer, const StepMetrics& m);
  // Waits for a background save and commits it. False when the last save failed.
  bool finish();
  bool stopped_by_signal() const { return stopped_; }

 private:
  void save(Trainer& trainer);
  void report(const std::optional<checkpoint::SaveOutcome>& outcome);

  config::RunConfig run_;
  ProcessGrid grid_;
  std::optional<checkpoint::Saver> saver_;
  int64_t last_saved_step_ = -1;
  bool last_save_ok_ = true;
  bool stopped_ = false;
};

// `moeforge inspect CKPT`: prints the manifest and the tensor table and verifies every file.
// Returns the exit code: 0 when every check passes, 1 otherwise.
int inspect_checkpoint(const std::string& path);

}  // namespace moeforge
