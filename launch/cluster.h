// The cluster `moeforge plan` lays a run out on: configs/cluster.proto read from protobuf text
// format (ready files in cluster/*.pbtxt), with every field checked.
//
// Errors are ConfigErrors of one line naming the file, the line where there is one, the field
// and the reason, in the style of run configs (launch/config.h):
//   h100.pbtxt:5: gpu_memory_gib: must be > 0, got -80
//   h100.pbtxt: inter_node_gbps: required (per-GPU bandwidth to another node, GB/s)
//   h100.pbtxt:3:1: Message type "moeforge.config.ClusterConfig" has no field named "gpus".
#pragma once

#include <string>

#include "configs/cluster.pb.h"

namespace moeforge {

// A validated cluster in SI units.
struct Cluster {
  std::string name;
  int gpus_per_node = 8;
  int max_nodes = 1;
  double gpu_memory_bytes = 0;
  double peak_flops = 0;          // FLOP/s per GPU (bf16 dense)
  double compute_efficiency = 0;  // in (0, 1]
  double hbm_bytes_per_s = 0;
  double intra_bytes_per_s = 0, intra_latency_s = 0;
  double inter_bytes_per_s = 0, inter_latency_s = 0;
};

// Reads and validates a cluster file. Throws ConfigError.
Cluster load_cluster(const std::string& path);
// The same for text in memory; `source_name` stands for the file name in messages.
Cluster parse_cluster(const std::string& text, const std::string& source_name);

}  // namespace moeforge
