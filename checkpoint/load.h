// Loading a checkpoint into the current layout, whatever layout wrote it.
//
// For every parameter of this rank, the local block (padding rows aside) is filled from the
// stored pieces that intersect it: for each piece, the intersecting box is read from its dataset
// as an HDF5 hyperslab straight into place. So a tp=2 checkpoint loads on one rank, experts
// written under ep=2 load under ep=4, and vocabulary rows move between TP ranks. The AdamW
// moments are read the same way into the full local block, and this rank keeps its owned range
// (ZeRO-1) or all of it. Every element of every local block must be covered exactly once.
//
// Integrity: a shard file's size and SHA-256 are computed on a thread of their own while its
// hyperslabs are read, and checked against the manifest after any failed read of the file and
// for every file before load returns; on a mismatch every dataset of the file is read so the
// error names the damaged one (its Fletcher-32 check fails). A missing shard file, a tensor
// missing from the checkpoint or unknown to the model, another global shape and a dtype other
// than f32 each end in an Error naming the checkpoint, the file or tensor, and what was
// expected. A failed load leaves the registry partly overwritten.
//
// Pipelines: a rank's registry holds only its stage's parameters, so "unknown to the model"
// means unknown to every stage. Given the pipeline group (ProcessGrid::pp()), one all-reduce over
// it marks the stored tensors some stage holds; the rest are the other model's. Besides that
// all-reduce, no communication: every rank reads what it needs. Run while no save is in flight.
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
// its AdamW moments and step count. `pipeline`: the group whose registries together hold the
// whole model (collective over it); nullptr when `registry` alone holds every parameter.
// Every chunk read is checked against its Fletcher-32 checksum (and HDF5 checks its metadata);
// with verify_sha256 each file opened is also hashed, on a thread of its own while the chunks
// are read, and checked against the manifest's SHA-256. Only the f32 masters are written: a
// bf16 model's compute copies are the caller's to refresh (ParamRegistry::refresh_compute, once
// the values are on the registry's device).
LoadedState load(const std::string& step_dir, ParamRegistry& registry, DistributedOptimizer* optimizer,
                 Comm* pipeline = nullptr, bool verify_sha256 = false);

// Checks every file of a checkpoint: size and SHA-256 against the manifest, every dataset read
// in full (Fletcher-32) and its attributes against the tensor index. One line per problem;
// empty when the checkpoint is sound.
std::vector<std::string> verify(const std::string& step_dir);

}  // namespace moeforge::checkpoint
