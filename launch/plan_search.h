// `moeforge plan`: every layout of a run on N GPUs of a cluster, estimated with the step model of
// launch/plan.h, ranked by tokens/s per GPU; infeasible layouts keep the reason. Printed as a
// table and written as JSON (docs/planning.md explains the columns and the assumptions).
//
// Layouts enumerated: tp dividing N up to one node (TP across nodes would put every layer's
// gathers on the slow link), pp dividing N / tp up to n_layers, virtual stages 1, 2, 4
// (interleaved 1F1B; with one stage also GPipe), ep dividing n_experts, micro-batches 1, 2, 4, 8,
// recomputation off / on, ZeRO stage 0 / 1. Memory is the worst pipeline stage's rank on GPUs
// (bf16 parameters and activations, fp32 gradients, fp32 master weights and Adam moments).
#pragma once

#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "configs/moeforge.pb.h"
#include "launch/cluster.h"
#include "launch/plan.h"

namespace moeforge {

struct LayoutEstimate {
  PlanLayout layout;
  std::string infeasible;  // empty when the layout runs; else why not
  // Bytes per GPU on the fullest pipeline stage.
  double params = 0, grads = 0, optimizer = 0, activations = 0, buffers = 0;
  double memory() const { return params + grads + optimizer + activations + buffers; }
  // Bytes one rank puts into each group per step (the busiest stage's rank).
  double tp_bytes = 0, ep_bytes = 0, pp_bytes = 0, dp_bytes = 0, expert_dp_bytes = 0, other_bytes = 0;
  // Seconds per step: compute, exposed communication inside the pipeline, pipeline bubble,
  // gradient reduction and optimizer after it.
  double compute_s = 0, comm_s = 0, bubble_s = 0, optimizer_s = 0, step_s = 0;
  double tokens_per_s_per_gpu = 0, mfu = 0;
};

struct PlanResult {
  int gpus = 0;
  std::vector<LayoutEstimate> layouts;  // feasible first, fastest first; then the infeasible
  int feasible = 0;
};

// Estimates every layout of `run` (its model and train sections) on `gpus` GPUs of `cluster`.
PlanResult plan_layouts(const config::RunConfig& run, const Cluster& cluster, int gpus);
// One layout's estimate; `infeasible` says why it cannot run (a config rule, or memory).
LayoutEstimate estimate_layout(const config::RunConfig& run, const Cluster& cluster, const PlanLayout& layout);

std::string format_plan(const PlanResult& plan, const config::RunConfig& run, const Cluster& cluster, int top = 15);
nlohmann::json plan_json(const PlanResult& plan, const Cluster& cluster);

// A run config for planning: the file's model and train sections, its layout fields reset (they
// are what is planned). Throws ConfigError.
config::RunConfig load_plan_config(const std::string& path);

// The subcommand: prints the table, writes JSON when json_path is not empty. gpus 0: one node.
// The config's parallel section and train.micro_batch are ignored: they are what is planned.
int run_plan(const std::string& config_path, const std::string& cluster_path, int gpus, const std::string& json_path);

}  // namespace moeforge
