#include "launch/trainer.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <limits>

#include <fmt/format.h>

#include "data/byte_tokenizer.h"
#include "launch/config.h"
#include "launch/generate.h"
#ifdef MOEFORGE_WITH_CUDA
#include "runtime/cuda/device.h"
#include "runtime/cuda/device_alloc.h"
#endif

namespace moeforge {

namespace fs = std::filesystem;

namespace {

double unix_time() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

std::string format_duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "--:--";
  const int64_t s = static_cast<int64_t>(seconds + 0.5);
  if (s >= 3600) return fmt::format("{}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60);
  return fmt::format("{:02}:{:02}", s / 60, s % 60);
}

// Per MoE layer: load (L, E+1) i64 = copies per expert, then dropped copies.
std::vector<MoeLayerLoad> summarize_load(const Tensor& load, const MoeTransformer& model) {
  const int64_t L = load.dim(0), E = load.dim(1) - 1;
  std::vector<MoeLayerLoad> out;
  for (int64_t i = 0; i < L; ++i) {
    if (!model.is_moe_layer(static_cast<int>(i))) continue;
    const int64_t* c = load.data<int64_t>() + i * (E + 1);
    MoeLayerLoad& l = out.emplace_back();
    l.layer = static_cast<int>(i);
    l.min_tokens = *std::min_element(c, c + E);
    l.max_tokens = *std::max_element(c, c + E);
    double sum = 0.0, sq = 0.0;
    for (int64_t e = 0; e < E; ++e) sum += static_cast<double>(c[e]);
    const double mean = sum / static_cast<double>(E);
    for (int64_t e = 0; e < E; ++e) sq += (static_cast<double>(c[e]) - mean) * (static_cast<double>(c[e]) - mean);
    l.cv = mean > 0.0 ? std::sqrt(sq / static_cast<double>(E)) / mean : 0.0;
    l.dropped_fraction = sum > 0.0 ? static_cast<double>(c[E]) / sum : 0.0;
  }
  return out;
}

std::string format_rate(double tokens_per_s) {
  if (tokens_per_s >= 1e6) return fmt::format("{:.2f}M", tokens_per_s / 1e6);
  if (tokens_per_s >= 1e3) return fmt::format("{:.1f}k", tokens_per_s / 1e3);
  return fmt::format("{:.0f}", tokens_per_s);
}

LrScheduleKind schedule_kind(config::OptimConfig::Schedule s) {
  switch (s) {
    case config::OptimConfig::COSINE: return LrScheduleKind::kCosine;
    case config::OptimConfig::WSD: return LrScheduleKind::kWsd;
    case config::OptimConfig::CONSTANT: return LrScheduleKind::kConstant;
  }
  MOE_THROW("optim.schedule: unknown value {}", static_cast<int>(s));
}

// The validation split: data.val, or <data.train>/../val when that exists.
std::string val_dir(const config::DataConfig& d) {
  if (!d.val().empty()) return d.val();
  const fs::path sibling = fs::path(d.train()).parent_path() / "val";
  return fs::exists(sibling) ? sibling.string() : std::string();
}

}  // namespace

Device run_device(const config::RunConfig& run, int world_rank) {
  const auto& t = run.train();
  if (t.device() == config::TrainConfig::CPU) return Device::cpu();
#ifdef MOEFORGE_WITH_CUDA
  const int gpus = cuda::device_count();
  MOE_CHECK(gpus > 0, "train.device: CUDA, but no CUDA device is visible to rank {} (check CUDA_VISIBLE_DEVICES "
            "and the driver)", world_rank);
  return Device::cuda(world_rank % gpus);
#else
  MOE_THROW("train.device: CUDA, but this moeforge was built without the CUDA backend (rebuild with "
            "-DMOEFORGE_CUDA=ON), rank {}", world_rank);
#endif
}

Trainer::Trainer(const config::RunConfig& run, const ProcessGrid& grid) : run_(run), grid_(grid) {
  const auto& t = run_.train();
  if (t.threads() > 0) omp_set_num_threads(t.threads());
  MOE_CHECK(grid_.device().is_cuda() == (t.device() == config::TrainConfig::CUDA),
            "Trainer: train.device is {} but the process grid was created for {}",
            config::TrainConfig::Device_Name(t.device()), grid_.device().str());
  // The fused attention's kernel (the environment's MOEFORGE_ATTENTION_KERNEL still overrides it).
  cuda::set_attention_kernel(attention_kernel_from(run_));
  ModelConfig mc = model_config_from(run_);
  // BF16: bf16 weight copies and activations, fp32 masters, gradients and AdamW state.
  mc.compute_dtype = t.precision() == config::TrainConfig::BF16 ? DType::kBF16 : DType::kF32;

  train_data_ = std::make_unique<data::TokenDataset>(run_.data().train(), mc.vocab_size);
  train_sampler_ = std::make_unique<data::Sampler>(*train_data_, t.seq_len(), t.seed());
  const std::string val = val_dir(run_.data());
  if (!val.empty()) {
    val_data_ = std::make_unique<data::TokenDataset>(val, mc.vocab_size);
    // A separate seed stream: the validation set is the same fixed samples at every evaluation.
    val_sampler_ = std::make_unique<data::Sampler>(*val_data_, t.seq_len(), t.seed() ^ 0x76616c69646174ull);
  }

  model_ = std::make_unique<MoeTransformer>(mc, grid_, pipeline_split_from(run_));
  schedule_kind_ = pipeline_schedule_from(run_);
  model_->registry().init(t.seed());
  const auto& o = run_.optim();
  optimizer_ = std::make_unique<DistributedOptimizer>(
      model_->registry(), grid_,
      AdamWOptions{.beta1 = o.beta1(), .beta2 = o.beta2(), .eps = o.eps(), .weight_decay = o.weight_decay()},
      run_.parallel().zero_stage());
  schedule_ = std::make_unique<LrSchedule>(LrScheduleOptions{.peak_lr = o.lr(),
                                                             .min_lr = o.min_lr(),
                                                             .warmup_steps = o.warmup_steps(),
                                                             .total_steps = t.steps(),
                                                             .kind = schedule_kind(o.schedule()),
                                                             .decay_fraction = o.decay_fraction()});
  if (grid_.world_rank() == 0) {  // one process owns the metrics files
    const fs::path log_dir = run_.logging().dir();
    metrics_ = std::make_unique<MetricsLogger>(run_.logging().tensorboard() ? log_dir : fs::path(),
                                               run_.logging().jsonl() ? log_dir / "metrics.jsonl" : fs::path());
  }

  tokens_ = Tensor::empty({t.micro_batch(), t.seq_len()}, DType::kI32);
  targets_ = Tensor::empty({t.micro_batch(), t.seq_len()}, DType::kI32);
}

int Trainer::p2p_tag(int model_chunk, int micro_batch, bool forward, int micro_batches) {
  return 1 + ((model_chunk * micro_batches + micro_batch) * 2 + (forward ? 0 : 1));
}

void Trainer::fill(data::Sampler& sampler, uint64_t first_sample) {
  sampler.fill_batch(first_sample, run_.train().micro_batch(), tokens_, targets_);
}

Trainer::PipelineRun Trainer::run_pipeline(int64_t micro_batches, uint64_t first_sample) {
  const auto& t = run_.train();
  Comm& pp = grid_.pp();
  const int P = pp.size(), s = pp.rank(), G = model_->split().chunks();
  const int m = static_cast<int>(micro_batches);
  const int64_t rows = model_->local_rows(t.micro_batch(), t.seq_len()), C = model_->config().dim;
  const float scale = 1.0f / static_cast<float>(micro_batches);
  PipelineRun out;
  const auto begin = std::chrono::steady_clock::now();
  double compute = 0.0;
  for (const PipelineAction& a : pipeline_actions(schedule_kind_, P, model_->chunks(), m, s)) {
    const int g = model_->split().model_chunk(s, a.chunk);
    if (a.forward) fill(*train_sampler_, first_sample + static_cast<uint64_t>(a.micro_batch * t.micro_batch()));
    Tensor in;
    if (a.forward ? g > 0 : g < G - 1) {  // the input comes from the neighbouring pipeline rank
      in = Tensor::empty({rows, C}, model_->compute_dtype(), grid_.device());
      pp.recv(in, a.forward ? (s + P - 1) % P : (s + 1) % P, p2p_tag(g, a.micro_batch, a.forward, m));
    }
    const auto t0 = std::chrono::steady_clock::now();
    Tensor result;
    if (a.forward) {
      ChunkLoss part;
      result = model_->forward_chunk(a.chunk, a.micro_batch, tokens_, targets_, in, part);
      out.ce += part.ce;
      out.aux += part.aux;
      out.z += part.z;
      out.peak_activation_bytes = std::max(out.peak_activation_bytes, model_->activation_bytes());
      out.max_in_flight = std::max(out.max_in_flight, model_->units_in_flight());
    } else {
      result = model_->backward_chunk(a.chunk, a.micro_batch, in, scale);
    }
    compute += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (result.defined()) {
      const int next = a.forward ? g + 1 : g - 1;
      pp.isend(result, a.forward ? (s + 1) % P : (s + P - 1) % P, p2p_tag(next, a.micro_batch, a.forward, m));
    }
  }
  pp.wait_sends();
  const double total = std::chrono::duration<double>(std::chrono::steady_clock::now() - begin).count();
  out.bubble = total > 0.0 ? std::max(0.0, 1.0 - compute / total) : 0.0;
  return out;
}

StepMetrics Trainer::step() {
  const auto& t = run_.train();
  const auto start = std::chrono::steady_clock::now();
  const int dp = grid_.dp().size();
  const int64_t micro_batches = t.global_batch() / dp / t.micro_batch();  // per DP rank
  StepMetrics m;
  m.lr = schedule_->lr(step_);

  model_->registry().zero_grad();
  model_->reset_load();
  const data::SampleRange range = data::dp_slice(step_, t.global_batch(), dp, grid_.dp().rank());
  const PipelineRun run = run_pipeline(micro_batches, range.first);
  optimizer_->reduce_gradients();
  m.grad_norm = optimizer_->clip_grad_norm(run_.optim().grad_clip());
  optimizer_->step(static_cast<float>(m.lr));  // also refreshes bf16 compute copies

  // Expert loads of the global batch on every rank: stages hold different layers, DP ranks
  // different data (TP ranks the same numbers).
  const Tensor load = model_->load();
  grid_.dp().all_reduce(load);
  grid_.pp().all_reduce(load);
  model_->update_expert_bias(load);
  m.moe = summarize_load(load, *model_);

  // The reported losses are means over every micro-batch of the global batch. Summed over the
  // world, each part counts once: ce on one rank per DP rank (the last stage's TP rank 0), the
  // aux and z parts on every rank (they are partial over TP ranks and stages).
  const bool ce_owner = model_->last_chunk(model_->chunks() - 1) && grid_.tp_rank() == 0;
  const Tensor totals = Tensor::from_floats({3}, std::vector<float>{static_cast<float>(ce_owner ? run.ce : 0.0),
                                                                    static_cast<float>(run.aux),
                                                                    static_cast<float>(run.z)});
  grid_.world().all_reduce(totals);
  const Tensor worst = Tensor::from_floats({3}, std::vector<float>{static_cast<float>(run.bubble),
                                                                   static_cast<float>(run.peak_activation_bytes),
                                                                   static_cast<float>(run.max_in_flight)});
  grid_.world().all_reduce(worst, ReduceOp::kMax);
  const double all_micro = static_cast<double>(micro_batches * dp);
  m.loss.ce = totals.data<float>()[0] / all_micro;
  m.loss.aux = totals.data<float>()[1] / all_micro;
  m.loss.z = totals.data<float>()[2] / all_micro;
  const ModelConfig& mc = model_->config();
  m.loss.loss = m.loss.ce + mc.aux_loss_coef * m.loss.aux + mc.z_loss_coef * m.loss.z;
  m.bubble = worst.data<float>()[0];
  m.peak_activation_bytes = static_cast<int64_t>(worst.data<float>()[1]);
  m.max_in_flight = static_cast<int64_t>(worst.data<float>()[2]);

  ++step_;
  next_sample_ = static_cast<uint64_t>(step_ * t.global_batch());
  m.step = step_;
#ifdef MOEFORGE_WITH_CUDA
  // The optimizer's kernels are still queued: the step's time includes its device work.
  if (grid_.device().is_cuda()) cuda::synchronize(grid_.device().index);
#endif
  m.step_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  m.tokens_per_s = static_cast<double>(t.global_batch() * t.seq_len()) / m.step_seconds;
  return m;
}

Tensor Trainer::pipeline_forward(const Tensor& tokens, const Tensor& targets, ChunkLoss* loss) {
  Comm& pp = grid_.pp();
  const int P = pp.size(), s = pp.rank(), G = model_->split().chunks();
  const int64_t B = tokens.dim(0), T = tokens.dim(1);
  const int64_t rows = model_->local_rows(B, loss ? T : model_->padded_length(B, T));
  Tensor out;
  for (int g = s; g < G; g += P) {  // model order: this rank's chunks are g = c * P + s
    Tensor in;
    if (g > 0) {
      in = Tensor::empty({rows, model_->config().dim}, model_->compute_dtype(), grid_.device());
      pp.recv(in, (s + P - 1) % P, p2p_tag(g, 0, true, 1));
    }
    const int c = g / P;
    Tensor r = loss ? model_->forward_chunk(c, 0, tokens, targets, in, *loss, /*keep=*/false)
                    : model_->logits_chunk(c, tokens, in);
    if (g < G - 1) {
      pp.isend(r, (s + 1) % P, p2p_tag(g + 1, 0, true, 1));
    } else {
      out = r;
    }
  }
  pp.wait_sends();
  if (!loss && P > 1) {  // the last stage's logits (host memory), for every rank's sampler
    if (!out.defined()) out = Tensor::empty({B, T, model_->config().vocab_size}, DType::kF32);
    pp.broadcast(out, (G - 1) % P);
  }
  return out;
}

double Trainer::evaluate() {
  if (!val_sampler_) return std::numeric_limits<double>::quiet_NaN();
  const auto& t = run_.train();
  const int dp = grid_.dp().size();
  ChunkLoss part;  // this DP rank's share: micro-batches dp_rank, dp_rank + dp, ...
  for (int64_t b = grid_.dp().rank(); b < t.eval_batches(); b += dp) {
    fill(*val_sampler_, static_cast<uint64_t>(b * t.micro_batch()));
    pipeline_forward(tokens_, targets_, &part);
  }
  // Summed over the world, the mean CE of each micro-batch counts once (last stage, TP rank 0).
  const bool ce_owner = model_->last_chunk(model_->chunks() - 1) && grid_.tp_rank() == 0;
  const Tensor total = Tensor::from_floats({1}, std::vector<float>{static_cast<float>(ce_owner ? part.ce : 0.0)});
  grid_.world().all_reduce(total);
  return total.data<float>()[0] / static_cast<double>(t.eval_batches());
}

std::string Trainer::sample(const std::string& prompt) {
  const auto& t = run_.train();
  std::vector<int32_t> ids{data::kBos};
  const std::vector<int32_t> text = data::encode(prompt);
  ids.insert(ids.end(), text.begin(), text.end());
  const auto logits = [&](const Tensor& tokens) { return pipeline_forward(tokens, Tensor(), nullptr); };
  const std::vector<int32_t> out = generate(logits, model_->config().vocab_size, ids,
                                            SampleOptions{.max_new_tokens = t.sample_tokens(),
                                                          .temperature = t.sample_temperature(),
                                                          .seed = t.seed(),
                                                          .context = t.seq_len(),
                                                          .stop_token = data::kEos});
  return data::decode(out);
}

std::string Trainer::format_step_line(const StepMetrics& m, double elapsed_s) const {
  const int64_t total = run_.train().steps();
  const double eta = elapsed_s / static_cast<double>(m.step) * static_cast<double>(total - m.step);
  const std::string pipeline =
      grid_.pp().size() > 1 ? fmt::format(" | bubble {:.0f}% act {:.1f} MB", 100.0 * m.bubble,
                                          static_cast<double>(m.peak_activation_bytes) / 1e6)
                            : std::string();
  return fmt::format("step {:>{}}/{} | loss {:.4f} (ce {:.4f} aux {:.4f} z {:.3f}) | lr {:.2e} | gnorm {:.3f} | {} tok/s{} | {} | ETA {}",
                     m.step, std::to_string(total).size(), total, m.loss.loss, m.loss.ce, m.loss.aux, m.loss.z, m.lr,
                     m.grad_norm, format_rate(m.tokens_per_s), pipeline, format_duration(elapsed_s), format_duration(eta));
}

std::string Trainer::format_moe_line(const StepMetrics& m) {
  std::string line = "  moe tokens/expert min/max/cv, dropped:";
  for (size_t i = 0; i < m.moe.size(); ++i) {
    const MoeLayerLoad& l = m.moe[i];
    line += fmt::format(" L{} {}/{}/{:.2f} {:.1f}%", l.layer, l.min_tokens, l.max_tokens, l.cv, 100.0 * l.dropped_fraction);
  }
  return line;
}

void Trainer::restore_position(int64_t steps) {
  MOE_CHECK(steps >= 0 && steps <= run_.train().steps(), "resume: step {} is outside [0, train.steps = {}]", steps,
            run_.train().steps());
  step_ = steps;
  next_sample_ = static_cast<uint64_t>(step_ * run_.train().global_batch());
}

void Trainer::run(const StepHook& after_step) {
  const auto& t = run_.train();
  const bool root = grid_.world_rank() == 0;
  const ModelConfig& mc = model_->config();
  if (root) {
  // Active per token: every dense parameter, and top_k / n_experts of the routed experts.
  int64_t active = 0;
  for (const Param& p : model_->registry().params()) {
    if (p.spec.replica) continue;
    const int64_t n = p.spec.global_shape.numel();
    active += p.spec.expert ? n / mc.n_experts * mc.top_k : n;
  }
  fmt::print("moeforge: {} parameters, {} active per token ({} layers, {} experts top-{}, dim {}) on {}, {} train tokens{}\n",
             model_->registry().global_numel(), active, mc.n_layers, mc.n_experts, mc.top_k, mc.dim,
             grid_.device().is_cuda() ? "cuda" : "cpu", train_data_->size(),
             val_data_ ? fmt::format(", {} validation tokens", val_data_->size()) : std::string(", no validation split"));
  const std::string pipeline =
      grid_.pp().size() > 1 ? fmt::format(" x pp {} ({}, {} chunks)", grid_.pp().size(), schedule_name(schedule_kind_),
                                          model_->split().chunks())
                            : std::string();
  fmt::print("moeforge: {} ranks (tp {} x dp {}{}{}{}), {} steps x {} sequences x {} tokens, {} micro-batches per rank and step, logging to {}\n",
             grid_.world_size(), grid_.tp().size(), grid_.dp().size(), pipeline,
             grid_.ep().size() > 1 ? fmt::format(", ep {}", grid_.ep().size()) : std::string(),
             run_.parallel().zero_stage() ? ", ZeRO-1" : "",
             t.steps(), t.global_batch(), t.seq_len(), t.global_batch() / grid_.dp().size() / t.micro_batch(),
             run_.logging().dir());
  std::fflush(stdout);
  }

  const auto start = std::chrono::steady_clock::now();
  double tokens_per_s_sum = 0.0;
  int64_t rate_steps = 0;
  while (step_ < t.steps()) {
    const StepMetrics m = step();
    const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    // The first step includes one-time allocation; leave it out of the throughput average.
    if (m.step > 1) {
      tokens_per_s_sum += m.tokens_per_s;
      ++rate_steps;
    }
    const bool last = m.step == t.steps();
    std::map<std::string, double> scalars;
    if (m.step % t.log_every() == 0 || last || m.step == 1) {
      if (root) fmt::print("{}\n{}\n", format_step_line(m, elapsed), format_moe_line(m));
      scalars = {{"train/loss", m.loss.loss}, {"train/ce", m.loss.ce},      {"train/aux", m.loss.aux},
                 {"train/z", m.loss.z},       {"train/lr", m.lr},           {"train/grad_norm", m.grad_norm},
                 {"train/tokens_per_s", m.tokens_per_s}, {"train/elapsed_s", elapsed}};
      if (grid_.pp().size() > 1) {
        scalars["pipeline/bubble"] = m.bubble;
        scalars["pipeline/peak_activation_bytes"] = static_cast<double>(m.peak_activation_bytes);
      }
      for (size_t i = 0; i < m.moe.size(); ++i) {
        const std::string p = fmt::format("moe/layer{}/", m.moe[i].layer);
        scalars[p + "tokens_min"] = static_cast<double>(m.moe[i].min_tokens);
        scalars[p + "tokens_max"] = static_cast<double>(m.moe[i].max_tokens);
        scalars[p + "tokens_cv"] = m.moe[i].cv;
        scalars[p + "dropped_fraction"] = m.moe[i].dropped_fraction;
      }
    }
    if ((t.eval_every() > 0 && m.step % t.eval_every() == 0) || last) {
      const double val = evaluate();
      if (std::isfinite(val)) {
        if (root) fmt::print("step {} | validation loss {:.4f} nats/token ({:.3f} bits/byte)\n", m.step, val, val / std::log(2.0));
        scalars["val/loss"] = val;
      }
      if (t.sample_at_eval() && !last) {
        const std::string text = sample(t.sample_prompt());
        if (root) fmt::print("sample: {}\n", text);
      }
    }
    if (metrics_ && !scalars.empty()) metrics_->log(m.step, unix_time(), scalars);
    std::fflush(stdout);
    if (after_step && after_step(m)) return;
  }
  if (root && rate_steps > 0) {
    fmt::print("moeforge: trained {} steps, mean {} tok/s\n", step_, format_rate(tokens_per_s_sum / static_cast<double>(rate_steps)));
  }
  if (t.sample_tokens() > 0) {
    const std::string text = sample(t.sample_prompt());
    if (root) {
      fmt::print("sample (prompt \"{}\", temperature {}):\n{}{}\n", t.sample_prompt(), t.sample_temperature(),
                 t.sample_prompt(), text);
    }
  }
  std::fflush(stdout);
}

}  // namespace moeforge
