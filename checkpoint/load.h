// Loading a checkpoint into the current layout, whatever layout wrote it.
//
// For every parameter of this rank, the local block (padding rows aside) is filled from the
// stored pieces that intersect it: for each piece, the intersecting box is read from its dataset
// as an HDF5 hyperslab straight into place. So a tp=2 checkpoint loads on one rank, experts
// written under ep=2 load under ep=4, and vocabulary rows move between TP ranks. The AdamW
// moments are read the same way into the full local block, and this rank keeps its owned range
// (ZeRO-1) or all of it. Every element of every local block must be covered exactly once.
//
// Integrity: before its first read from a shard file, the file's size and SHA-256 are checked
// against the manifest; on a mismatch every dataset of the file is read so the error names the
// damaged one (its Fletcher-32 check fails). A missing shard file, a tensor missing from the
// checkpoint or unknown to the model, another global shape and a dtype other than f32 each end
// in an Error naming the checkpoint, the file or tensor, and what was expected.
//
// No communication: every rank reads what it needs. Run while no save is in flight.
#pragma once

#include <cstdint>
#include <string>

#include "checkpoint/checkpoint.pb.h"
#include "optim/distributed_optimizer.h"

namespace moeforge::checkpoint {

struct LoadedState {
  std::string path;  // the step directory read
  Manifest manifest;  // with its tensor index
};

// Loads the step directory `step_dir` into the registry's local blocks and, with an optimizer,
// its AdamW moments and step count.
LoadedState load(const std::string& step_dir, ParamRegistry& registry, DistributedOptimizer* optimizer);

// Checks every file of a checkpoint: size and SHA-256 against the manifest, every dataset read
// in full (Fletcher-32) and its attributes against the tensor index. One line per problem;
// empty when the checkpoint is sound.
std::vector<std::string> verify(const std::string& step_dir);

}  // namespace moeforge::checkpoint
