#include "launch/plan.h"

#include <algorithm>
#include <vector>

namespace moeforge {

namespace {

// Sizes of one layout that every formula uses. N = B*T tokens of a micro-batch, Nl = N / tp the
// rows of the residual stream on a rank (sequence parallelism).
struct Dims {
  int64_t C, N, Nl, B, T, Hl, Hkvl, D, E, El, K, F, SF, Fd, Vl;
  int G;  // model chunks
  PipelineSplit split;
};

Dims dims_of(const ModelConfig& cfg, const PlanLayout& l, const StepShape& s) {
  Dims d{};
  d.C = cfg.dim;
  d.B = l.micro_batch;
  d.T = s.seq_len;
  d.N = d.B * d.T;
  d.Nl = d.N / l.tp;
  d.Hl = cfg.n_heads / l.tp;
  d.Hkvl = cfg.n_kv_heads / l.tp;
  d.D = cfg.head_dim;
  d.E = cfg.n_experts;
  d.El = d.E / l.ep;
  d.K = cfg.top_k;
  d.F = cfg.expert_hidden;
  d.SF = int64_t{cfg.n_shared_experts} * cfg.expert_hidden;
  d.Fd = cfg.dense_hidden;
  d.Vl = (cfg.vocab_size + l.tp - 1) / l.tp;  // rows of the padded vocabulary per TP rank
  d.split = split_layers(cfg.n_layers, l.pp, l.vstages, "");
  d.G = d.split.chunks();
  return d;
}

// Layers [first, end) of virtual chunk c on pipeline rank s.
std::pair<int, int> chunk_layers(const Dims& d, int s, int c) {
  const int g = d.split.model_chunk(s, c);
  return {d.split.first_layer[static_cast<size_t>(g)], d.split.first_layer[static_cast<size_t>(g) + 1]};
}

bool is_moe(const ModelConfig& cfg, int layer) { return layer >= cfg.n_dense_layers; }

int expert_dp_rank(const PlanLayout& l, const RankCoord& r) { return (r.dp_rank * l.tp + r.tp_rank) / l.ep; }

// Elements a ZeRO-1 flat vector of n elements over g members gives member `rank` (its chunk,
// less the padding past n): Flat::build in optim/distributed_optimizer.cpp.
int64_t owned_of_flat(int64_t n, int g, int rank) {
  const int64_t chunk = (n + g - 1) / g;
  return std::clamp<int64_t>(n - chunk * rank, 0, chunk);
}
int64_t padded_flat(int64_t n, int g) { return (n + g - 1) / g * g; }

enum class Op { kAllReduce, kReduceScatter, kAllGather, kAllToAll, kSend };

void add(GroupTraffic& t, Op op, double bytes, int group_size, double calls = 1) {
  if (group_size <= 1) return;  // a SelfComm counts nothing
  const double g = group_size;
  const double wire = op == Op::kAllReduce       ? 2 * (g - 1) / g
                      : op == Op::kReduceScatter ? (g - 1) / g
                      : op == Op::kAllGather     ? g - 1
                                                 : 1.0;
  t.bytes += bytes;
  t.calls += calls;
  t.wire += wire * bytes;
}

}  // namespace

ExpertRows uniform_expert_rows(const ModelConfig& cfg, const PlanLayout& l, const StepShape& s) {
  const double M = static_cast<double>(l.micro_batch * s.seq_len / l.tp * cfg.top_k);
  const double away = M * (l.ep - 1) / l.ep;
  return {away, away, M};
}

RankParams rank_params(const ModelConfig& cfg, const PlanLayout& l, const RankCoord& r) {
  const Dims d = dims_of(cfg, l, StepShape{1, l.tp});  // parameters do not depend on the batch
  const int s = r.pp_rank;
  const bool has_first = s == 0, has_last = s == l.pp - 1;
  RankParams p;
  // Dense parameters whole on every TP rank are TP partial sums when tp > 1.
  int64_t& whole = l.tp > 1 ? p.tp_whole : p.tp_split;
  if (has_first || (has_last && cfg.tie_embeddings)) {
    p.tp_split += d.Vl * d.C;
    if (cfg.tie_embeddings && l.pp > 1) p.tied += d.Vl * d.C;
  }
  const int64_t HD = cfg.n_heads * d.D, KD = cfg.n_kv_heads * d.D;
  for (int c = 0; c < l.vstages; ++c) {
    const auto [first, end] = chunk_layers(d, s, c);
    for (int i = first; i < end; ++i) {
      whole += d.C;                                  // attn_norm
      p.tp_split += (2 * HD + 2 * KD) / l.tp * d.C;  // wq, wo; wk, wv
      if (is_moe(cfg, i)) {
        whole += d.C + d.E * d.C;  // moe_norm, router
        if (cfg.expert_bias_update_rate > 0.0f) p.frozen += d.E;
        p.expert += 3 * d.El * d.F * d.C;
        whole += 3 * d.SF * d.C;
      } else {
        whole += d.C + 3 * d.Fd * d.C;
      }
    }
  }
  if (has_last) {
    whole += d.C;  // final_norm
    if (!cfg.tie_embeddings) p.tp_split += d.Vl * d.C;
  }
  return p;
}

int64_t optimizer_elements(const ModelConfig& cfg, const PlanLayout& l, const RankCoord& r) {
  const RankParams p = rank_params(cfg, l, r);
  if (l.zero_stage == 0) return p.trainable();
  return owned_of_flat(p.tp_split + p.tp_whole, l.dp, r.dp_rank) +
         owned_of_flat(p.expert, l.tp * l.dp / l.ep, expert_dp_rank(l, r));
}

double unit_activation_bytes(const ModelConfig& cfg, const PlanLayout& l, const StepShape& shape, const RankCoord& r,
                             int c, const Precision& prec, const ExpertRows& rows) {
  const Dims d = dims_of(cfg, l, shape);
  const double a = static_cast<double>(prec.act), i32 = 4, i64 = 8;
  const double N = static_cast<double>(d.N), Nl = static_cast<double>(d.Nl), C = static_cast<double>(d.C);
  const double M = Nl * static_cast<double>(d.K), R = rows.received;
  const int g = d.split.model_chunk(r.pp_rank, c);
  double bytes = 0;
  if (g == 0) bytes += N * i32;  // tokens
  const auto [first, end] = chunk_layers(d, r.pp_rank, c);
  for (int i = first; i < end; ++i) {
    if (l.recompute) {  // only the layer input stays; backward re-runs the layer
      bytes += Nl * C * a;
      continue;
    }
    bytes += 2 * Nl * C * a;  // h_in, h_mid
    // Attention: rstd, xn (all N rows), q, k, v, out, lse.
    bytes += (Nl + N * C + N * static_cast<double>((2 * d.Hl + 2 * d.Hkvl) * d.D) + N * static_cast<double>(d.Hl)) * a;
    if (is_moe(cfg, i)) {
      const double E = static_cast<double>(d.E), K = static_cast<double>(d.K);
      bytes += (Nl * C + Nl + Nl * E + Nl + Nl * K) * a;  // xn, rstd, logits, lse, weights
      bytes += 2 * Nl * K * i32 + E * i64;                // experts, positions; counts
      bytes += (R * C + 3 * R * static_cast<double>(d.F) + M * C) * a;  // xl, gate/up/act, y
      bytes += 3 * Nl * static_cast<double>(d.SF) * a;                  // shared experts
    } else {
      bytes += (Nl * C + Nl + 3 * Nl * static_cast<double>(d.Fd)) * a;
    }
  }
  if (g == d.G - 1) {  // targets; h_final, f_rstd, f (all rows), logits (N, Vl), lse
    bytes += N * i32 + (Nl * C + Nl + N * C + N * static_cast<double>(d.Vl) + N) * a;
  }
  return bytes;
}

double peak_activation_bytes(const ModelConfig& cfg, const PlanLayout& l, const StepShape& shape, const RankCoord& r,
                             const Precision& prec, const ExpertRows& rows) {
  const int m = static_cast<int>(shape.global_batch / l.dp / l.micro_batch);
  std::vector<double> unit(static_cast<size_t>(l.vstages));
  for (int c = 0; c < l.vstages; ++c) unit[static_cast<size_t>(c)] = unit_activation_bytes(cfg, l, shape, r, c, prec, rows);
  double held = 0, peak = 0;
  for (const PipelineAction& a : pipeline_actions(l.schedule, l.pp, l.vstages, m, r.pp_rank)) {
    held += (a.forward ? 1 : -1) * unit[static_cast<size_t>(a.chunk)];
    if (a.forward) peak = std::max(peak, held);
  }
  return peak;
}

StepTraffic step_traffic(const ModelConfig& cfg, const PlanLayout& l, const StepShape& shape, const RankCoord& r,
                         const Precision& prec, const ExpertRows& rows) {
  const Dims d = dims_of(cfg, l, shape);
  const double a = static_cast<double>(prec.act);
  const double N = static_cast<double>(d.N), Nl = static_cast<double>(d.Nl), C = static_cast<double>(d.C);
  const double m = static_cast<double>(shape.global_batch / l.dp / l.micro_batch);
  const int tp = l.tp, ep = l.ep, pp = l.pp, stage = l.tp * l.dp, edp = stage / l.ep;
  StepTraffic t;

  // One layer's forward (run again in backward under recomputation), per micro-batch.
  const auto layer_forward = [&](int i, double times) {
    add(t.tp, Op::kAllGather, times * Nl * C * a, tp, times);  // attention: gather the normalised rows
    add(t.tp, Op::kReduceScatter, times * N * C * a, tp, times);   // attention: reduce-scatter wo's partial sums
    if (!is_moe(cfg, i)) return;
    if (cfg.capacity_factor > 0.0f) {
      add(t.tp, Op::kAllGather, times * static_cast<double>(d.K * d.E) * 8, tp, times);  // all-gather (K, E) counts
    } else {
      add(t.tp, Op::kAllReduce, times * static_cast<double>(d.E) * 8, tp, times);  // all-reduce the per-expert counts
    }
    add(t.ep, Op::kAllToAll, times * static_cast<double>((ep - 1) * d.El) * 8, ep, times);  // plan_dispatch's counts
    add(t.ep, Op::kAllToAll, times * rows.to_others * C * a, ep, times);  // to_experts
    add(t.ep, Op::kAllToAll, times * rows.from_others * C * a, ep, times);  // from_experts
  };
  const auto layer_backward = [&](int i, double times) {
    add(t.tp, Op::kAllGather, times * Nl * C * a, tp, times);  // gather dh_out
    add(t.tp, Op::kReduceScatter, times * N * C * a, tp, times);  // reduce-scatter dxn
    if (!is_moe(cfg, i)) return;
    add(t.ep, Op::kAllToAll, times * rows.to_others * C * a, ep, times);  // to_experts(dy)
    add(t.ep, Op::kAllToAll, times * rows.from_others * C * a, ep, times);  // from_experts(dxl)
  };

  for (int c = 0; c < l.vstages; ++c) {
    const int g = d.split.model_chunk(r.pp_rank, c);
    const auto [first, end] = chunk_layers(d, r.pp_rank, c);
    if (g == 0) {
      add(t.tp, Op::kReduceScatter, m * N * C * a, tp, m);  // forward: vocab-parallel embedding, reduce-scatter
      add(t.tp, Op::kAllGather, m * Nl * C * a, tp, m);  // backward: gather dh for the embedding gradient
    }
    for (int i = first; i < end; ++i) {
      layer_forward(i, l.recompute ? 2 * m : m);
      layer_backward(i, m);
    }
    if (g == d.G - 1) {
      add(t.tp, Op::kAllGather, m * Nl * C * a, tp, m);  // gather the final norm's rows
      add(t.tp, Op::kAllGather, m * N * 3 * 4, tp, m);  // gather the cross-entropy partials (N, 3) f32
      add(t.tp, Op::kReduceScatter, m * N * C * a, tp, m);  // backward: reduce-scatter df
    }
    if (g < d.G - 1) add(t.pp, Op::kSend, m * Nl * C * a, pp, m);  // forward output to the next chunk
    if (g > 0) add(t.pp, Op::kSend, m * Nl * C * a, pp, m);  // input gradient to the previous chunk
  }

  // DistributedOptimizer::reduce_gradients, clip_grad_norm and step.
  const RankParams p = rank_params(cfg, l, r);
  const double gb = static_cast<double>(prec.grad), pb = static_cast<double>(prec.param);
  const bool ends = r.pp_rank == 0 || r.pp_rank == pp - 1;
  if (p.tied > 0 && ends) add(t.embed, Op::kAllReduce, static_cast<double>(p.tied) * gb, 2);
  if (l.zero_stage == 0) {
    add(t.dp, Op::kAllReduce, static_cast<double>(p.tp_split) * gb, l.dp);
    add(t.stage, Op::kAllReduce, static_cast<double>(p.tp_whole) * gb, stage);
    add(t.expert_dp, Op::kAllReduce, static_cast<double>(p.expert) * gb, edp);
  } else {
    add(t.tp_opt, Op::kAllReduce, static_cast<double>(p.tp_whole) * gb, tp);
    const int64_t dense = p.tp_split + p.tp_whole;
    if (dense > 0) {
      add(t.dp, Op::kReduceScatter, static_cast<double>(padded_flat(dense, l.dp)) * gb, l.dp);       // reduce-scatter
      add(t.dp, Op::kAllGather, static_cast<double>(padded_flat(dense, l.dp) / l.dp) * pb, l.dp);  // all-gather
    }
    if (p.expert > 0) {
      add(t.expert_dp, Op::kReduceScatter, static_cast<double>(padded_flat(p.expert, edp)) * gb, edp);
      add(t.expert_dp, Op::kAllGather, static_cast<double>(padded_flat(p.expert, edp) / edp) * pb, edp);
    }
  }
  if (stage > 1 || pp > 1) {  // grad norm: (hi, lo) f32 over the stage and the pipeline
    add(t.stage, Op::kAllReduce, 8, stage);
    add(t.pp_opt, Op::kAllReduce, 8, pp);
  }
  // Trainer::step: expert loads (L, E+1) i64 over DP and PP, loss sums and worst-case metrics.
  const double load = static_cast<double>(cfg.n_layers) * static_cast<double>(d.E + 1) * 8;
  add(t.dp, Op::kAllReduce, load, l.dp);
  add(t.pp_opt, Op::kAllReduce, load, pp);
  add(t.world, Op::kAllReduce, 2 * 3 * 4, l.world(), 2);
  return t;
}

double chunk_forward_flops(const ModelConfig& cfg, const PlanLayout& l, const StepShape& shape, const RankCoord& r,
                           int c, const ExpertRows& rows) {
  const Dims d = dims_of(cfg, l, shape);
  const double N = static_cast<double>(d.N), Nl = static_cast<double>(d.Nl), C = static_cast<double>(d.C);
  const double T = static_cast<double>(d.T), D = static_cast<double>(d.D);
  const int g = d.split.model_chunk(r.pp_rank, c);
  double f = 0;
  const auto [first, end] = chunk_layers(d, r.pp_rank, c);
  for (int i = first; i < end; ++i) {
    // q, k, v, o projections over all N rows for this rank's heads; causal attention: QK^T and
    // PV over T/2 keys on average, or with a sliding window W < T over min(i + 1, W) keys at
    // query i (documents are not known here: their mask is not counted).
    f += 2 * N * C * static_cast<double>((2 * d.Hl + 2 * d.Hkvl) * d.D);
    const double W = static_cast<double>(cfg.sliding_window);
    const double keys = W > 0 && W < T ? (W * (W + 1) / 2 + (T - W) * W) / T : T / 2;
    f += 4 * N * keys * static_cast<double>(d.Hl) * D;
    if (is_moe(cfg, i)) {
      f += 2 * Nl * C * static_cast<double>(d.E);                   // router
      f += 6 * rows.received * C * static_cast<double>(d.F);        // routed experts (w1, w3, w2)
      f += 6 * Nl * C * static_cast<double>(d.SF);                  // shared experts
    } else {
      f += 6 * Nl * C * static_cast<double>(d.Fd);
    }
  }
  if (g == d.G - 1) f += 2 * N * C * static_cast<double>(d.Vl);  // LM head over this rank's vocabulary
  return f;
}

}  // namespace moeforge
