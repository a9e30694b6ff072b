// The run configuration: configs/moeforge.proto read from protobuf text format, changed by
// `--set path.to.field=value` overrides, completed with its derived defaults and validated.
//
// Loading is all-or-nothing: either a RunConfig in which every field and every cross-field rule
// holds for the given world size, or a ConfigError whose message is one line naming where the
// offending value came from, the field and the reason:
//   run.pbtxt:7: model.n_heads: 12 is not divisible by model.n_kv_heads = 5
//   --set train.seq_len=512: train.seq_len: must be in [1, model.max_seq_len = 256], got 512
//   run.pbtxt: train.global_batch: 32 is not divisible by train.micro_batch * parallel.dp = 8 * 8 = 64 (default value)
//   run.pbtxt:3:3: Message type "moeforge.config.ModelConfig" has no field named "topk".
// A value's place is the last one that set it (overrides apply after the file, in order). A rule
// that involves several fields points at the one set last, preferring the field it names first.
//
// Derived defaults are filled in the returned config, so the trainer and the logs see the actual
// values: model.head_dim 0 becomes dim / n_heads, parallel.dp 0 becomes world_size / (tp * pp).
#pragma once

#include <string>
#include <vector>

#include "configs/moeforge.pb.h"
#include "models/model_config.h"
#include "models/pipeline_split.h"
#include "parallel/pipeline_schedule.h"
#include "runtime/cuda/attention_kernel.h"
#include "runtime/error.h"

namespace moeforge {

// A configuration error: the message already names the place (file:line or the --set) and the field.
class ConfigError : public Error {
 public:
  using Error::Error;
};

// Parses `path` (protobuf text format), applies `overrides` ("path.to.field=value", in order),
// fills derived defaults (model.head_dim 0 -> dim / n_heads; parallel.dp 0 -> world_size / (tp*pp)),
// and validates every field and every cross-field rule against `world_size`. Throws ConfigError.
config::RunConfig load_run_config(const std::string& path, const std::vector<std::string>& overrides,
                                  int world_size = 1);

// The same, for a config already in memory (tests); `source_name` plays the role of the file name.
config::RunConfig parse_run_config(const std::string& text, const std::string& source_name,
                                   const std::vector<std::string>& overrides, int world_size = 1);

// The pipeline layer split and schedule of a validated run configuration.
PipelineSplit pipeline_split_from(const config::RunConfig& run);
PipelineSchedule pipeline_schedule_from(const config::RunConfig& run);
// The model's hyper-parameters; head_dim 0 is taken as dim / n_heads.
ModelConfig model_config_from(const config::RunConfig& run);
// train.attention_kernel as the CUDA runtime's choice, its origin "train.attention_kernel: <VALUE>"
// (kAuto has none).
cuda::AttentionKernelChoice attention_kernel_from(const config::RunConfig& run);

// The config as protobuf text (for logs / checkpoints), every field written out, defaults
// included; parse_run_config reads it back unchanged.
std::string to_text(const config::RunConfig& run);

}  // namespace moeforge
