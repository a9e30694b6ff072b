// The MoE transformer with explicit forward and backward (DESIGN.md, Model):
//   embedding -> L x [attention block, MoE block (or a dense FFN for the first n_dense_layers)]
//   -> RMSNorm -> LM head -> cross-entropy.
//
// loss = ce + aux_loss_coef * sum_layers aux + z_loss_coef * sum_layers z, where ce is the mean
// over non-ignored targets (target < 0 is ignored) of the micro-batch.
//
// Pipeline parallelism (models/pipeline_split.h): the layers are cut into pp * v model chunks and
// this rank holds the v chunks of its pipeline rank; only those layers' parameters are registered
// here, plus the embedding with model chunk 0 and the final norm and LM head with the last chunk
// (tied embeddings: the last stage keeps a replica of embed.weight whose gradient is summed with
// the first stage's over grid.embed()). forward_chunk / backward_chunk run one chunk for one
// micro-batch and keep its activations per (chunk, micro-batch) until its backward, so any
// pipeline schedule can interleave micro-batches. With pp = 1 there is one chunk, and forward() /
// backward() run it as the whole model.
//
// Tensor parallelism (tp = grid.tp().size()): every TP rank receives the same micro-batch.
// The embedding and the LM head are vocab-parallel (rows of the vocabulary, padded up to a
// multiple of tp, split over TP; padding rows are never looked up and their logits are masked
// out of the loss); the residual stream between them is split by token rows (sequence
// parallelism, parallel/sequence_parallel.h), so a pipeline sends only a rank's rows; attention
// is head-parallel (models/attention.h); the MoE block runs whole experts on local rows
// (models/moe_block.h). Expert parallelism (ep = grid.ep().size()): each MoE layer's experts are
// split over the EP group and its tokens travel through the token dispatcher.
//
// Device: the model runs on grid.device() (models/device_tensors.h). Parameters, gradients and
// activations live there; tokens and targets may be passed on any device (host buffers of the
// data loader: the ids are copied to the device once per micro-batch and chunk); the losses, the
// expert loads and logits() come back on the host.
#pragma once

#include <map>
#include <optional>
#include <utility>
#include <vector>

#include "models/attention.h"
#include "models/dense_block.h"
#include "models/model_config.h"
#include "models/moe_block.h"
#include "models/param_registry.h"
#include "models/pipeline_split.h"
#include "parallel/process_grid.h"

namespace moeforge {

struct LossReport {
  double loss = 0.0;  // the optimised total
  double ce = 0.0;    // mean cross-entropy over counted targets
  double aux = 0.0;   // sum over layers of the load-balancing loss (unweighted)
  double z = 0.0;     // sum over layers of the router z-loss (unweighted)
  int64_t targets = 0;  // counted (non-ignored) targets
};

// What one chunk's forward contributes to a micro-batch's losses on this rank: ce and targets
// from the last chunk (the same on every TP rank), this rank's partial sums of aux and z over the
// chunk's layers (they add up over TP ranks and chunks to the micro-batch's sums).
struct ChunkLoss {
  double ce = 0.0;
  int64_t targets = 0;
  double aux = 0.0, z = 0.0;
};

class MoeTransformer {
 public:
  MoeTransformer(const ModelConfig& cfg, const ProcessGrid& grid = ProcessGrid::single(),
                 const PipelineSplit& split = PipelineSplit{1, 1, {}});
  MoeTransformer(const MoeTransformer&) = delete;
  MoeTransformer& operator=(const MoeTransformer&) = delete;

  const ModelConfig& config() const { return cfg_; }
  ParamRegistry& registry() { return registry_; }
  const ParamRegistry& registry() const { return registry_; }
  // The vocabulary rounded up to a multiple of tp (rows of the embedding and LM head).
  int64_t padded_vocab() const { return padded_vocab_; }
  const PipelineSplit& split() const { return split_; }
  // Where parameters and activations live (grid.device()).
  Device device() const { return registry_.device(); }
  // The activations' dtype (ModelConfig::compute_dtype): f32, or bf16 mixed precision.
  DType compute_dtype() const { return registry_.compute_dtype(); }

  // ---- pipeline interface: chunk c = 0..v-1 of this rank ----
  int chunks() const { return split_.virtual_stages; }
  bool first_chunk(int c) const { return split_.model_chunk(stage_, c) == 0; }
  bool last_chunk(int c) const { return split_.model_chunk(stage_, c) == split_.chunks() - 1; }
  // Forward of chunk c for micro-batch mb. tokens, targets: (B, T) i32, the micro-batch (every
  // rank passes them; the first chunk embeds tokens, the last uses targets). h_in: (Nl, C), the
  // previous chunk's output (undefined for the first chunk). Returns the chunk's output (Nl, C),
  // or an undefined tensor for the last chunk; adds this rank's loss parts to `loss`. With keep,
  // the activations stay for backward_chunk(c, mb) and the expert loads are added to load().
  Tensor forward_chunk(int c, int mb, const Tensor& tokens, const Tensor& targets, const Tensor& h_in,
                       ChunkLoss& loss, bool keep = true);
  // Backward of chunk c for micro-batch mb: dh_out (Nl, C), the next chunk's input gradient
  // (undefined for the last chunk, which starts from the loss). Accumulates loss_scale * the
  // parameter gradients and returns the gradient of h_in (Nl, C), undefined for the first chunk.
  // Releases the activations of (c, mb).
  Tensor backward_chunk(int c, int mb, const Tensor& dh_out, float loss_scale);
  // The sequence length logits_chunk pads T to (B * Tp divisible by tp).
  int64_t padded_length(int64_t B, int64_t T) const;
  // Rows of the residual stream on this rank for a micro-batch of B x T tokens.
  int64_t local_rows(int64_t B, int64_t T) const { return B * T / grid_.tp().size(); }
  // Bytes of the activations currently kept for backward, and the (chunk, micro-batch) units.
  int64_t activation_bytes() const;
  int64_t units_in_flight() const { return static_cast<int64_t>(acts_.size()); }

  // Expert loads since reset_load(): (L, E+1) i64, row i = layer i's token copies routed to each
  // expert (before capacity drops), then the copies dropped, summed over the kept forwards of this
  // rank; rows of layers on other stages, and of dense layers, stay 0. Every TP rank of a stage
  // holds the same numbers.
  const Tensor& load() const { return load_; }
  void reset_load();
  // Whether layer i has an MoE block (else a dense FFN).
  bool is_moe_layer(int i) const { return i >= cfg_.n_dense_layers; }
  // Aux-loss-free balancing: moves the expert bias of this rank's MoE layers from load (L, E+1)
  // i64 summed over the step's global batch (the same on every rank). No-op when the bias is off.
  void update_expert_bias(const Tensor& load);

  // ---- whole model (pp = 1) ----
  // tokens, targets: (B, T) i32, the same on every TP rank; B*T divisible by tp.
  LossReport forward(const Tensor& tokens, const Tensor& targets);
  // Accumulates loss_scale * d loss / d parameter for the loss of the last forward() and releases
  // its activations. Gradient accumulation over micro-batches passes 1 / micro_batches.
  void backward(float loss_scale = 1.0f);
  // Next-token logits (B, T, V) for tokens (B, T) i32, on every TP rank, without keeping anything
  // for backward. The logits are host memory whatever the model's device.
  Tensor logits(const Tensor& tokens);
  // Chunk c's part of logits(): h_in from the previous chunk for a non-first chunk; returns the
  // output (Nl', C) of a non-last chunk or the logits (B, T, V) of the last chunk (on every TP
  // rank). The micro-batch is padded to Tp >= T positions so that B * Tp divides over TP.
  Tensor logits_chunk(int c, const Tensor& tokens, const Tensor& h_in);
  // Per layer of this rank, the experts chosen for this rank's rows in the last forward():
  // (Nl, K) i32 each (MoE layers only).
  std::vector<Tensor> last_routing() const;

 private:
  struct LayerActs {
    Tensor h_in;   // (Nl, C)
    Tensor h_mid;  // (Nl, C) between the attention and FFN blocks
    AttentionActs attn;
    MoeActs moe;
    DenseActs dense;
  };
  struct Layer {
    int index;
    AttentionBlock attn;
    std::optional<MoeBlock> moe;
    std::optional<DenseFfnBlock> dense;
  };
  // Activations of one (chunk, micro-batch).
  struct ChunkActs {
    int64_t batch = 0, seq = 0;
    ops::AttentionMask mask;        // every layer's attention mask for this micro-batch
    std::vector<LayerActs> layers;  // the chunk's layers, in order
    Tensor tokens;   // (N) i32, first chunk
    // Last chunk:
    Tensor targets;  // (N) i32
    int64_t counted = 0;
    Tensor h_final;  // (Nl, C) input of the final norm
    Tensor f_rstd;   // (Nl)
    Tensor f;        // (N, C) normalised, all rows
    Tensor logits;   // (N, Vl)
    Tensor lse;      // (N)
  };

  Layer& layer(int i) { return layers_[static_cast<size_t>(layer_slot_[static_cast<size_t>(i)])]; }
  const Layer& layer(int i) const { return layers_[static_cast<size_t>(layer_slot_[static_cast<size_t>(i)])]; }
  std::pair<int, int> chunk_range(int c) const;  // [first, end) layers of chunk c
  void layer_forward(int i, int64_t B, int64_t T, const ops::AttentionMask& mask, const Tensor& h_in,
                     const Tensor& h_out, LayerActs& acts) const;
  // The attention mask of a (B, T) micro-batch: the model's window, and its documents (each
  // document_start_token starts one) as cumulative lengths on the model's device.
  ops::AttentionMask attention_mask(const Tensor& tokens) const;
  // Embedding (first chunk) or h_in, then the chunk's layers; fills a (layers, tokens) and adds
  // the layers' aux/z parts and loads. Returns the chunk's last hidden state (Nl, C).
  Tensor run_layers(int c, const Tensor& tokens, const Tensor& h_in, ChunkActs& a, ChunkLoss& loss, bool keep);
  // Final norm of h (Nl, C): fills a.h_final / a.f_rstd and returns the normalised rows (N, C).
  Tensor final_norm(const Tensor& h, ChunkActs& a) const;
  // Logits of this rank's vocabulary rows (N, Vl) for the final hidden state f (N, C).
  Tensor head_logits(const Tensor& f) const;
  const Param& head() const;
  int64_t vocab_start() const;   // first vocabulary row of this TP rank
  int64_t vocab_valid() const;   // real (non-padding) rows of this TP rank

  ModelConfig cfg_;
  ProcessGrid grid_;
  PipelineSplit split_;
  int stage_ = 0;                // pipeline rank
  int64_t padded_vocab_;
  ParamRegistry registry_;
  Param* embed_ = nullptr;       // (Vl, C) of global (V_pad, C): first chunk, or last chunk's tied replica
  Param* final_norm_ = nullptr;  // (C), last chunk
  Param* lm_head_ = nullptr;     // (Vl, C), last chunk, null when tied to embed_
  std::vector<Layer> layers_;    // this rank's layers, in model order (not contiguous when v > 1)
  std::vector<int> layer_slot_;  // model layer -> position in layers_ (-1: not on this rank)

  std::map<std::pair<int, int>, ChunkActs> acts_;  // (chunk, micro-batch)
  Tensor load_;                                    // (L, E+1) i64
};

}  // namespace moeforge
