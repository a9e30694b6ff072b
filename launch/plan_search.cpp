#include "launch/plan_search.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <map>

#include <fmt/format.h>

#include "launch/config.h"

namespace moeforge {

namespace {

constexpr double kGiB = 1073741824.0;

// Why a layout cannot run this model and batch (the rules of launch/config.cpp), or "". A reason
// reads "<rule>: <numbers>", so the report can count the layouts each rule excludes.
std::string invalid_reason(const ModelConfig& cfg, const StepShape& shape, const PlanLayout& l) {
  if (cfg.n_heads % l.tp || cfg.n_kv_heads % l.tp)
    return fmt::format("tp does not divide the heads: tp {}, n_heads {}, n_kv_heads {}", l.tp, cfg.n_heads,
                       cfg.n_kv_heads);
  if (cfg.n_experts % l.ep) return fmt::format("ep does not divide n_experts: ep {}, {} experts", l.ep, cfg.n_experts);
  if ((l.tp * l.dp) % l.ep)
    return fmt::format("ep does not divide tp x dp: ep {}, tp x dp = {}", l.ep, l.tp * l.dp);
  if ((l.micro_batch * shape.seq_len) % l.tp)
    return fmt::format("tp does not divide a micro-batch's tokens: tp {}, {} tokens", l.tp,
                       l.micro_batch * shape.seq_len);
  if (shape.global_batch % (l.micro_batch * l.dp))
    return fmt::format("micro_batch x dp does not divide global_batch: {} x {} vs {}", l.micro_batch, l.dp,
                       shape.global_batch);
  const int64_t m = shape.global_batch / l.micro_batch / l.dp;
  if (l.schedule == PipelineSchedule::kInterleaved && m % l.pp)
    return fmt::format("interleaved needs micro-batches in multiples of pp: {} per DP rank, pp {}", m, l.pp);
  try {
    split_layers(cfg.n_layers, l.pp, l.vstages, "");
  } catch (const Error& e) {
    return fmt::format("layers do not split into pp x virtual_stages chunks: {}", e.what());
  }
  return {};
}

// Link of a group whose members span aligned blocks of `block` consecutive ranks: inside a node
// when such a block fits a node (ranks are numbered node by node), else the inter-node link.
struct Link {
  double bw, lat;
};
Link link_of(const Cluster& c, int64_t block, int world) {
  const bool intra = world <= c.gpus_per_node || (block <= c.gpus_per_node && c.gpus_per_node % block == 0);
  return intra ? Link{c.intra_bytes_per_s, c.intra_latency_s} : Link{c.inter_bytes_per_s, c.inter_latency_s};
}
double seconds(const GroupTraffic& t, const Link& link) { return t.wire / link.bw + t.calls * link.lat; }

}  // namespace

LayoutEstimate estimate_layout(const config::RunConfig& run, const Cluster& cluster, const PlanLayout& l) {
  ModelConfig cfg = model_config_from(run);
  cfg.recompute = l.recompute;
  const StepShape shape{run.train().global_batch(), run.train().seq_len()};
  LayoutEstimate e;
  e.layout = l;
  e.infeasible = invalid_reason(cfg, shape, l);
  if (!e.infeasible.empty()) return e;

  const Precision prec = Precision::gpu_bf16();
  const ExpertRows rows = uniform_expert_rows(cfg, l, shape);
  const int world = l.world();
  const double m = static_cast<double>(shape.global_batch / l.micro_batch / l.dp);
  const double flop_rate = cluster.peak_flops * cluster.compute_efficiency;
  const Link tp_link = link_of(cluster, l.tp, world), ep_link = link_of(cluster, l.ep, world);
  const Link stage_link = link_of(cluster, int64_t{l.tp} * l.dp, world), world_link = link_of(cluster, world, world);

  double slowest_mb = 0, model_flops = 0;
  for (int s = 0; s < l.pp; ++s) {
    const RankCoord r{0, 0, s};  // DP rank 0 owns the largest ZeRO-1 chunk
    const RankParams p = rank_params(cfg, l, r);
    const double params = static_cast<double>(p.total()) * static_cast<double>(prec.param);
    const double grads = static_cast<double>(p.total()) * static_cast<double>(prec.grad);
    const double optimizer = static_cast<double>(optimizer_elements(cfg, l, r)) * static_cast<double>(prec.optimizer);
    double acts = peak_activation_bytes(cfg, l, shape, r, prec, rows);
    const StepTraffic t = step_traffic(cfg, l, shape, r, prec, rows);
    double fwd = 0;
    for (int c = 0; c < l.vstages; ++c) fwd += chunk_forward_flops(cfg, l, shape, r, c, rows);
    if (l.recompute) {  // backward rebuilds one layer's activations at a time
      PlanLayout full = l;
      full.recompute = false;
      ModelConfig no_rc = cfg;
      no_rc.recompute = false;
      const int layers = std::max(1, cfg.n_layers / (l.pp * l.vstages));
      acts += unit_activation_bytes(no_rc, full, shape, r, 0, prec, rows) / layers;
    }
    // Communication buffers: the ZeRO-1 flat gradient vector (or one 16 MiB all-reduce bucket),
    // the dispatcher's arrival buffer, a received pipeline activation.
    const double dense = static_cast<double>(p.tp_split + p.tp_whole), expert = static_cast<double>(p.expert);
    double buffers = l.zero_stage == 1 ? std::max(dense, expert) * static_cast<double>(prec.grad) * (1.0 + 1.0 / l.dp)
                                       : std::min(16.0 * 1048576.0, std::max(dense, expert) * prec.grad);
    const double Nl = static_cast<double>(l.micro_batch * shape.seq_len / l.tp);
    buffers += rows.received * static_cast<double>(cfg.dim) * prec.act;
    if (l.pp > 1) buffers += 2 * Nl * static_cast<double>(cfg.dim) * prec.act;
    if (params + grads + optimizer + acts + buffers > e.memory()) {
      e.params = params, e.grads = grads, e.optimizer = optimizer, e.activations = acts, e.buffers = buffers;
    }

    const double compute_mb = fwd * (l.recompute ? 4.0 : 3.0) / flop_rate;
    const double comm_mb = (seconds(t.tp, tp_link) + seconds(t.ep, ep_link) + seconds(t.pp, world_link)) / m;
    if (compute_mb + comm_mb > slowest_mb) {
      slowest_mb = compute_mb + comm_mb;
      e.compute_s = compute_mb * m;
      e.comm_s = comm_mb * m;
      e.tp_bytes = t.tp_total(), e.ep_bytes = t.ep.bytes, e.pp_bytes = t.pp_total();
    }
    // The reductions run after the pipeline (DistributedOptimizer), not overlapped; AdamW reads
    // and writes parameters, gradients and state once.
    const double opt = seconds(t.dp, stage_link) + seconds(t.stage, stage_link) + seconds(t.expert_dp, stage_link) +
                       seconds(t.tp_opt, tp_link) + seconds(t.pp_opt, world_link) + seconds(t.embed, world_link) +
                       seconds(t.world, world_link) + 2 * (params + grads + optimizer) / cluster.hbm_bytes_per_s;
    if (opt > e.optimizer_s) {
      e.optimizer_s = opt;
      e.dp_bytes = t.dp.bytes, e.expert_dp_bytes = t.expert_dp.bytes;
      e.other_bytes = t.stage.bytes + t.embed.bytes + t.world.bytes;
    }
    model_flops += 3 * fwd * m * l.tp * l.dp;  // every rank of this stage
  }
  // 1F1B and GPipe: m + pp - 1 micro-batch slots of the slowest stage; interleaving shrinks the
  // fill and drain to (pp - 1) / v (Megatron-LM, Narayanan et al. 2021, section 2.2).
  e.bubble_s = slowest_mb * (l.pp - 1) / l.vstages;
  e.step_s = slowest_mb * m + e.bubble_s + e.optimizer_s;
  e.tokens_per_s_per_gpu = static_cast<double>(shape.global_batch * shape.seq_len) / e.step_s / world;
  e.mfu = model_flops / (e.step_s * world * cluster.peak_flops);
  if (e.memory() > cluster.gpu_memory_bytes) {
    e.infeasible = fmt::format("out of memory: {:.1f} GiB of {:.1f} per GPU (params {:.1f}, grads {:.1f}, optimizer {:.1f}, "
                               "activations {:.1f}, buffers {:.1f})",
                               e.memory() / kGiB, cluster.gpu_memory_bytes / kGiB, e.params / kGiB, e.grads / kGiB,
                               e.optimizer / kGiB, e.activations / kGiB, e.buffers / kGiB);
  }
  return e;
}

PlanResult plan_layouts(const config::RunConfig& run, const Cluster& cluster, int gpus) {
  MOE_CHECK(gpus >= 1, "plan: --gpus must be >= 1, got {}", gpus);
  const int64_t available = int64_t{cluster.gpus_per_node} * cluster.max_nodes;
  if (gpus > available)
    throw ConfigError(fmt::format("plan: {} GPUs requested, the cluster '{}' has {} ({} nodes x {})", gpus,
                                  cluster.name, available, cluster.max_nodes, cluster.gpus_per_node));
  const ModelConfig cfg = model_config_from(run);
  PlanResult out;
  out.gpus = gpus;
  for (int tp = 1; tp <= std::min(gpus, cluster.gpus_per_node); ++tp) {
    if (gpus % tp) continue;
    for (int pp = 1; pp <= std::min(gpus / tp, cfg.n_layers); ++pp) {
      if ((gpus / tp) % pp) continue;
      const int dp = gpus / tp / pp;
      for (int v : {1, 2, 4}) {
        if (v > 1 && pp == 1) continue;
        std::vector<PipelineSchedule> schedules{PipelineSchedule::k1F1B};
        if (v > 1) schedules = {PipelineSchedule::kInterleaved};
        if (v == 1 && pp > 1) schedules.push_back(PipelineSchedule::kGPipe);
        for (PipelineSchedule sched : schedules)
          for (int ep = 1; ep <= cfg.n_experts; ++ep) {
            if (cfg.n_experts % ep) continue;
            for (int64_t mb : {1, 2, 4, 8})
              for (bool rc : {false, true})
                for (int zero : {0, 1}) {
                  if (zero == 1 && dp == 1 && tp * dp / ep == 1) continue;  // ZeRO-1 over one rank is stage 0
                  PlanLayout l;
                  l.tp = tp, l.pp = pp, l.vstages = v, l.ep = ep, l.dp = dp;
                  l.micro_batch = mb, l.recompute = rc, l.zero_stage = zero, l.schedule = sched;
                  out.layouts.push_back(estimate_layout(run, cluster, l));
                }
          }
      }
    }
  }
  std::stable_sort(out.layouts.begin(), out.layouts.end(), [](const LayoutEstimate& a, const LayoutEstimate& b) {
    if (a.infeasible.empty() != b.infeasible.empty()) return a.infeasible.empty();
    return a.tokens_per_s_per_gpu > b.tokens_per_s_per_gpu;
  });
  out.feasible = static_cast<int>(std::count_if(out.layouts.begin(), out.layouts.end(),
                                                [](const LayoutEstimate& e) { return e.infeasible.empty(); }));
  return out;
}

namespace {

// "tp2 pp4x2 ep8 dp8 mb1 rc z1": pp4x2 is 4 stages of 2 virtual chunks (interleaved 1F1B), "pp4
// gpipe" GPipe, plain "pp4" 1F1B; rc recomputation, z1 ZeRO-1.
std::string layout_text(const PlanLayout& l) {
  const std::string pp = l.vstages > 1                              ? fmt::format("pp{}x{}", l.pp, l.vstages)
                         : l.schedule == PipelineSchedule::kGPipe ? fmt::format("pp{} gpipe", l.pp)
                                                                  : fmt::format("pp{}", l.pp);
  return fmt::format("tp{} {} ep{} dp{} mb{}{}{}", l.tp, pp, l.ep, l.dp, l.micro_batch, l.recompute ? " rc" : "",
                     l.zero_stage ? " z1" : "");
}

std::string size_text(double bytes) {
  if (bytes >= 1e9) return fmt::format("{:.1f}G", bytes / 1e9);
  if (bytes >= 1e6) return fmt::format("{:.0f}M", bytes / 1e6);
  return fmt::format("{:.0f}k", bytes / 1e3);
}

}  // namespace

std::string format_plan(const PlanResult& plan, const config::RunConfig& run, const Cluster& cluster, int top) {
  const ModelConfig cfg = model_config_from(run);
  std::string s = fmt::format(
      "plan: {} layers dim {} {} experts top-{}, global batch {} x {} tokens on {} GPUs of {}\n"
      "      compute at {:.0f}% of {:.0f} TFLOP/s; memory per GPU {:.0f} GiB; {} layouts, {} feasible\n",
      cfg.n_layers, cfg.dim, cfg.n_experts, cfg.top_k, run.train().global_batch(), run.train().seq_len(), plan.gpus,
      cluster.name, 100 * cluster.compute_efficiency, cluster.peak_flops / 1e12, cluster.gpu_memory_bytes / kGiB,
      plan.layouts.size(), plan.feasible);
  s += fmt::format("{:>3}  {:<30} {:>6} {:>18} {:>8} {:>6} {:>6} {:>7} {:>9} {:>5}  {:>7} {:>7} {:>7} {:>7}\n", "#",
                   "layout", "mem", "p/g/o/act GiB", "step s", "bubble", "comm", "optim", "tok/s/gpu",
                   "MFU", "TP B", "EP B", "PP B", "DP B");
  for (int i = 0; i < std::min(top, plan.feasible); ++i) {
    const LayoutEstimate& e = plan.layouts[static_cast<size_t>(i)];
    s += fmt::format("{:>3}  {:<30} {:>5.1f}G {:>18} {:>8.3f} {:>5.1f}% {:>5.1f}% {:>6.1f}% {:>9.0f} {:>4.1f}%  {:>7} {:>7} {:>7} {:>7}\n",
                     i + 1, layout_text(e.layout), e.memory() / kGiB,
                     fmt::format("{:.1f}/{:.1f}/{:.1f}/{:.1f}", e.params / kGiB, e.grads / kGiB, e.optimizer / kGiB,
                                 e.activations / kGiB),
                     e.step_s, 100 * e.bubble_s / e.step_s, 100 * e.comm_s / e.step_s, 100 * e.optimizer_s / e.step_s,
                     e.tokens_per_s_per_gpu, 100 * e.mfu, size_text(e.tp_bytes), size_text(e.ep_bytes),
                     size_text(e.pp_bytes), size_text(e.dp_bytes + e.expert_dp_bytes));
  }
  if (plan.feasible == 0) s += "  no layout fits: see the reasons below\n";
  // Infeasible: how many for each kind of reason, and the fastest few that do not fit memory.
  std::map<std::string, int> kinds;
  for (const LayoutEstimate& e : plan.layouts)
    if (!e.infeasible.empty()) ++kinds[e.infeasible.substr(0, e.infeasible.find(':'))];
  if (!kinds.empty()) s += "infeasible layouts by rule:\n";
  for (const auto& [kind, n] : kinds) s += fmt::format("  {:>5}  {}\n", n, kind);
  // The layouts closest to fitting: what the smallest ones still need.
  std::vector<const LayoutEstimate*> oom;
  for (const LayoutEstimate& e : plan.layouts)
    if (e.infeasible.starts_with("out of memory")) oom.push_back(&e);
  std::sort(oom.begin(), oom.end(), [](const LayoutEstimate* a, const LayoutEstimate* b) { return a->memory() < b->memory(); });
  if (!oom.empty()) s += "closest to fitting:\n";
  for (size_t i = 0; i < std::min<size_t>(3, oom.size()); ++i)
    s += fmt::format("  {}: {}\n", layout_text(oom[i]->layout), oom[i]->infeasible);
  return s;
}

nlohmann::json plan_json(const PlanResult& plan, const Cluster& cluster) {
  nlohmann::json out = {{"gpus", plan.gpus}, {"cluster", cluster.name}, {"feasible", plan.feasible}};
  nlohmann::json& list = out["layouts"] = nlohmann::json::array();
  for (const LayoutEstimate& e : plan.layouts) {
    const PlanLayout& l = e.layout;
    nlohmann::json j = {{"tp", l.tp}, {"pp", l.pp}, {"virtual_stages", l.vstages}, {"ep", l.ep}, {"dp", l.dp},
                        {"micro_batch", l.micro_batch}, {"recompute", l.recompute}, {"zero_stage", l.zero_stage},
                        {"schedule", schedule_name(l.schedule)}, {"feasible", e.infeasible.empty()}};
    if (!e.infeasible.empty()) j["reason"] = e.infeasible;
    if (e.step_s > 0) {
      j["memory_bytes"] = {{"params", e.params}, {"grads", e.grads}, {"optimizer", e.optimizer},
                           {"activations", e.activations}, {"buffers", e.buffers}, {"total", e.memory()}};
      j["bytes_per_step"] = {{"tp", e.tp_bytes}, {"ep", e.ep_bytes}, {"pp", e.pp_bytes}, {"dp", e.dp_bytes},
                             {"expert_dp", e.expert_dp_bytes}, {"other", e.other_bytes}};
      j["seconds"] = {{"compute", e.compute_s}, {"exposed_comm", e.comm_s}, {"bubble", e.bubble_s},
                      {"optimizer", e.optimizer_s}, {"step", e.step_s}};
      j["tokens_per_s_per_gpu"] = e.tokens_per_s_per_gpu;
      j["mfu"] = e.mfu;
    }
    list.push_back(std::move(j));
  }
  return out;
}

config::RunConfig load_plan_config(const std::string& path) {
  // The layout fields are the planner's to choose: reset them so the config validates alone.
  const std::vector<std::string> reset = {"parallel.tp=1", "parallel.pp=1", "parallel.ep=1", "parallel.dp=1",
                                          "parallel.virtual_stages=1", "parallel.pp_schedule=ONE_F_ONE_B",
                                          "parallel.pp_split=", "parallel.zero_stage=0", "train.micro_batch=1",
                                          "data.train=(plan)"};
  return load_run_config(path, reset, 1);
}

int run_plan(const std::string& config_path, const std::string& cluster_path, int gpus, const std::string& json_path) {
  const config::RunConfig run = load_plan_config(config_path);
  const Cluster cluster = load_cluster(cluster_path);
  if (gpus == 0) gpus = cluster.gpus_per_node;
  const PlanResult plan = plan_layouts(run, cluster, gpus);
  std::fputs(format_plan(plan, run, cluster).c_str(), stdout);
  if (!json_path.empty()) {
    std::ofstream out(json_path);
    out << plan_json(plan, cluster).dump(1) << "\n";
    if (!out) throw Error(fmt::format("{}: cannot write the plan JSON", json_path));
  }
  return 0;
}

}  // namespace moeforge
