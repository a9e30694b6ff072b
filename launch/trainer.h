// The training loop of `moeforge train`, run by every rank of the job.
//
// One step: this rank's DP slice of the step's global samples (data/sampler.h: the slices of
// all DP ranks are the global batch, whatever dp is) is cut into micro-batches; each is filled
// from the sampler, run forward, and backward with loss scale 1/micro_batches_per_rank. The
// forwards and backwards of the micro-batches over this rank's model chunks run in the order of
// the pipeline schedule (parallel/pipeline_schedule.h; with pp = 1 simply forward, backward,
// forward, ...): a chunk's input arrives from the previous pipeline rank by recv, its output
// leaves by a non-blocking send tagged (model chunk, micro-batch, direction). The
// distributed optimizer then averages the gradients over DP (optim/distributed_optimizer.h), so
// they are the gradient of the mean loss over the global batch; then the global grad norm,
// clipping, the learning rate of this step and one AdamW update (ZeRO-1 when configured). TP
// ranks of one DP rank process the same micro-batches (models/transformer.h). Every log_every steps (and the last) rank
// 0 prints one line and appends the same metrics to metrics.jsonl and the TensorBoard events in
// logging.dir; every eval_every steps (and at the end) it measures the validation loss on a fixed
// set of validation samples; at the end it prints a sample continuation of train.sample_prompt.
//
// MoE telemetry: each step sums the layers' expert loads (copies per expert, copies dropped) over
// the micro-batches and the DP ranks, so every rank holds the global batch's loads; they feed the
// aux-loss-free bias update and, on logged steps, a console line and per-layer scalars
// (moe/layer{i}/tokens_min, tokens_max, tokens_cv, dropped_fraction).
//
// Device (train.device): the model, its gradients and the optimizer state live on grid.device().
// The data loader fills host buffers (tokens_, targets_); the model copies each micro-batch's ids
// to the device; pipeline messages travel on the device (NCCL); losses, loads and metrics are host
// values.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "configs/moeforge.pb.h"
#include "data/sampler.h"
#include "data/token_shard.h"
#include "launch/metrics.h"
#include "models/transformer.h"
#include "optim/distributed_optimizer.h"
#include "optim/lr_schedule.h"
#include "parallel/pipeline_schedule.h"

namespace moeforge {

// One MoE layer's expert load over a step's global batch.
struct MoeLayerLoad {
  int layer = 0;
  int64_t min_tokens = 0, max_tokens = 0;  // token copies routed to the least / most loaded expert
  double cv = 0.0;                         // coefficient of variation of the copies per expert
  double dropped_fraction = 0.0;           // copies dropped by the capacity / copies routed
};

struct StepMetrics {
  int64_t step = 0;  // 1-based number of the step just taken
  LossReport loss;   // averaged over the micro-batches
  double lr = 0.0;
  double grad_norm = 0.0;  // before clipping
  double tokens_per_s = 0.0;
  double step_seconds = 0.0;
  std::vector<MoeLayerLoad> moe;  // per MoE layer, the same on every rank
  // Pipeline: the largest fraction of the step's pipeline time a rank spent not computing
  // (waiting for activations or gradients), the most activation bytes a rank kept at once, and
  // the most (chunk, micro-batch) units a rank held in flight. The same on every rank.
  double bubble = 0.0;
  int64_t peak_activation_bytes = 0;
  int64_t max_in_flight = 0;
};

// The device this rank computes on for train.device: the CPU, or for CUDA the GPU
// (world_rank % visible GPUs) — ranks are placed on a node's GPUs in rank order. Throws an Error
// naming train.device when CUDA is asked of a build without the CUDA backend or of a machine with
// no visible GPU. The ProcessGrid is created for this device (main.cpp), and the Trainer runs the
// model there.
Device run_device(const config::RunConfig& run, int world_rank);

class Trainer {
 public:
  // Opens the datasets, builds and initialises the model on grid.device(), which must be the
  // device train.device asks for. Throws Error on bad data paths.
  Trainer(const config::RunConfig& run, const ProcessGrid& grid);

  // Runs train.steps steps with evaluation, logging and the final sample.
  // after_step, when given, runs after each step's logging and evaluation (checkpointing,
  // preemption); returning true stops the run there, without the final sample.
  using StepHook = std::function<bool(const StepMetrics&)>;
  void run(const StepHook& after_step = {});

  // One optimizer step on the next global batch; advances the data position.
  StepMetrics step();
  // Mean validation cross-entropy over train.eval_batches micro-batches of fixed samples (spread
  // over the DP ranks); NaN when there is no validation split.
  double evaluate();
  // A continuation of `prompt` (decoded text, without the prompt).
  std::string sample(const std::string& prompt);

  MoeTransformer& model() { return *model_; }
  int64_t steps_done() const { return step_; }
  // The next global sample index of the training stream (the whole data position).
  uint64_t data_position() const { return next_sample_; }
  DistributedOptimizer& optimizer() { return *optimizer_; }
  // Resume: continue after `steps` completed steps (the data position follows from it).
  void restore_position(int64_t steps);

 private:
  std::string format_step_line(const StepMetrics& m, double elapsed_s) const;
  static std::string format_moe_line(const StepMetrics& m);

  // What one step's pipeline run left on this rank.
  struct PipelineRun {
    double ce = 0.0, aux = 0.0, z = 0.0;  // loss parts summed over micro-batches (models/transformer.h)
    double bubble = 0.0;                  // idle fraction of the pipeline's wall time
    int64_t peak_activation_bytes = 0, max_in_flight = 0;
  };
  // The forwards and backwards of `micro_batches` micro-batches from `first_sample` on, in the
  // schedule's order.
  PipelineRun run_pipeline(int64_t micro_batches, uint64_t first_sample);
  // Forward only through the pipeline (evaluation, sampling), one micro-batch: this rank runs its
  // chunks in model order. With `loss`: adds the loss parts, returns nothing. Without: returns the
  // logits (B, T, V) on every rank.
  Tensor pipeline_forward(const Tensor& tokens, const Tensor& targets, ChunkLoss* loss);
  // Tag of a pipeline message: the receiving model chunk, micro-batch and direction.
  static int p2p_tag(int model_chunk, int micro_batch, bool forward, int micro_batches);
  void fill(data::Sampler& sampler, uint64_t first_sample);  // tokens_, targets_

  config::RunConfig run_;
  std::unique_ptr<data::TokenDataset> train_data_;
  std::unique_ptr<data::TokenDataset> val_data_;  // null without a validation split
  std::unique_ptr<data::Sampler> train_sampler_;
  std::unique_ptr<data::Sampler> val_sampler_;
  std::unique_ptr<MoeTransformer> model_;
  ProcessGrid grid_;
  std::unique_ptr<DistributedOptimizer> optimizer_;
  std::unique_ptr<LrSchedule> schedule_;
  PipelineSchedule schedule_kind_ = PipelineSchedule::k1F1B;
  std::unique_ptr<MetricsLogger> metrics_;
  int64_t step_ = 0;
  uint64_t next_sample_ = 0;
  Tensor tokens_, targets_;  // (micro_batch, seq_len) i32
};

}  // namespace moeforge
