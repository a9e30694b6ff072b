// Router top-k gating (softmax_topk, sigmoid_topk), its backward, and the router's two loss
// terms: the load-balancing auxiliary loss and the z-loss.
#include <algorithm>
#include <cmath>
#include <vector>

#include "runtime/cpu/moe.h"

namespace moeforge::cpu {
namespace {

// Below this many elements of work a loop stays serial: thread start-up would cost more.
constexpr int64_t kParallelMinWork = 1 << 15;

// Writes into a (E) the per-expert gate scores the weights are built from: softmax probabilities
// (stable, max subtracted) or sigmoid scores.
void gate_scores(const float* logits, int64_t num_experts, ops::Gating gating, float* a) {
  if (gating == ops::Gating::kSoftmaxTopK) {
    float mx = logits[0];
    for (int64_t e = 1; e < num_experts; ++e) mx = std::max(mx, logits[e]);
    float sum = 0.0f;
    for (int64_t e = 0; e < num_experts; ++e) {
      a[e] = std::exp(logits[e] - mx);
      sum += a[e];
    }
    const float inv = 1.0f / sum;
    for (int64_t e = 0; e < num_experts; ++e) a[e] *= inv;
  } else {
    for (int64_t e = 0; e < num_experts; ++e) a[e] = 1.0f / (1.0f + std::exp(-logits[e]));
  }
}

// Top k of score[e] = a[e] (+ bias[e]) into ids (K), descending; ties keep the lower expert id
// first because an entry only moves ahead of a strictly smaller one. top (K) is scratch. A NaN
// score never displaces anything but still fills an empty slot, so every id is valid and distinct.
void select_top_k(const float* a, const float* bias, int64_t num_experts, int k, int32_t* ids, float* top) {
  int filled = 0;
  for (int64_t e = 0; e < num_experts; ++e) {
    const float s = bias ? a[e] + bias[e] : a[e];
    if (filled == k && !(s > top[k - 1])) continue;
    int i = filled < k ? filled : k - 1;
    while (i > 0 && s > top[i - 1]) {
      top[i] = top[i - 1];
      ids[i] = ids[i - 1];
      --i;
    }
    top[i] = s;
    ids[i] = static_cast<int32_t>(e);
    if (filled < k) ++filled;
  }
}

// log-sum-exp of one row, stable.
float row_lse(const float* x, int64_t n) {
  float mx = x[0];
  for (int64_t i = 1; i < n; ++i) mx = std::max(mx, x[i]);
  float sum = 0.0f;
  for (int64_t i = 0; i < n; ++i) sum += std::exp(x[i] - mx);
  return mx + std::log(sum);
}

}  // namespace

void router_fwd(const Tensor& logits, ops::Gating gating, int k, const Tensor& bias, const Tensor& weights,
                const Tensor& experts, const Tensor& probs) {
  const int64_t n_rows = logits.dim(0);
  const int64_t num_experts = logits.dim(1);
  const float* pl = logits.data<float>();
  const float* pb = bias.defined() ? bias.data<float>() : nullptr;
  float* pw = weights.data<float>();
  int32_t* pe = experts.data<int32_t>();
  float* pp = probs.data<float>();

#pragma omp parallel if (n_rows * num_experts > kParallelMinWork)
  {
    std::vector<float> top(k);
#pragma omp for schedule(static)
    for (int64_t n = 0; n < n_rows; ++n) {
      float* a = pp + n * num_experts;  // gate scores first, then normalised in place below
      int32_t* ids = pe + n * k;
      float* w = pw + n * k;
      gate_scores(pl + n * num_experts, num_experts, gating, a);
      select_top_k(a, pb, num_experts, k, ids, top.data());
      float sel_sum = 0.0f;
      for (int j = 0; j < k; ++j) sel_sum += a[ids[j]];
      // Divided, not multiplied by 1/sel_sum: with k = 1 the weight is then exactly 1 (and its
      // gradient below exactly 0), not 1 +- an ulp.
      for (int j = 0; j < k; ++j) w[j] = a[ids[j]] / sel_sum;
      if (gating == ops::Gating::kSigmoidTopK) {
        // The aux loss wants a distribution over experts: scores normalised per token.
        float sum = 0.0f;
        for (int64_t e = 0; e < num_experts; ++e) sum += a[e];
        const float inv = 1.0f / sum;
        for (int64_t e = 0; e < num_experts; ++e) a[e] *= inv;
      }
    }
  }
}

// With a the gate scores and S = sum of a over the selected set, w_j = a_j / S gives
//   dL/da_j = (dw_j - sum_m dw_m w_m) / S        for selected j (0 elsewhere).
// softmax: a = p, and probs = p adds dprobs to da; dlogits = p * (da - <da, p>).
// sigmoid: a = s, and probs = s / sum_e s adds (dprobs_e - <dprobs, probs>) / sum_e s to ds_e;
//          dlogits = ds * s * (1 - s), with 1 - s computed as sigmoid(-logit) to keep its digits.
// The bias only chose the set; it has no gradient.
void router_bwd(const Tensor& logits, ops::Gating gating, const Tensor& experts, const Tensor& dweights,
                const Tensor& dprobs, const Tensor& dlogits) {
  const int64_t n_rows = logits.dim(0);
  const int64_t num_experts = logits.dim(1);
  const int k = static_cast<int>(experts.dim(1));
  check_expert_ids("router_bwd", experts, num_experts);
  const float* pl = logits.data<float>();
  const int32_t* pe = experts.data<int32_t>();
  const float* pdw = dweights.data<float>();
  const float* pdp = dprobs.defined() ? dprobs.data<float>() : nullptr;
  float* pdl = dlogits.data<float>();

#pragma omp parallel if (n_rows * num_experts > kParallelMinWork)
  {
    std::vector<float> a(num_experts);
#pragma omp for schedule(static)
    for (int64_t n = 0; n < n_rows; ++n) {
      const float* l = pl + n * num_experts;
      const int32_t* ids = pe + n * k;
      const float* dw = pdw + n * k;
      const float* dp = pdp ? pdp + n * num_experts : nullptr;
      float* da = pdl + n * num_experts;  // accumulates dL/da, then becomes dL/dlogits
      gate_scores(l, num_experts, gating, a.data());

      float sel_sum = 0.0f;
      for (int j = 0; j < k; ++j) sel_sum += a[ids[j]];
      const float inv_sel = 1.0f / sel_sum;
      float dw_dot_w = 0.0f;
      for (int j = 0; j < k; ++j) dw_dot_w += dw[j] * (a[ids[j]] / sel_sum);  // w_j as forward made it

      if (gating == ops::Gating::kSoftmaxTopK) {
        for (int64_t e = 0; e < num_experts; ++e) da[e] = dp ? dp[e] : 0.0f;
        for (int j = 0; j < k; ++j) da[ids[j]] += (dw[j] - dw_dot_w) * inv_sel;
        float da_dot_p = 0.0f;
        for (int64_t e = 0; e < num_experts; ++e) da_dot_p += da[e] * a[e];
        for (int64_t e = 0; e < num_experts; ++e) da[e] = a[e] * (da[e] - da_dot_p);
      } else {
        if (dp) {
          float sum = 0.0f;
          for (int64_t e = 0; e < num_experts; ++e) sum += a[e];
          const float inv = 1.0f / sum;
          float dp_dot_probs = 0.0f;
          for (int64_t e = 0; e < num_experts; ++e) dp_dot_probs += dp[e] * a[e] * inv;
          for (int64_t e = 0; e < num_experts; ++e) da[e] = (dp[e] - dp_dot_probs) * inv;
        } else {
          for (int64_t e = 0; e < num_experts; ++e) da[e] = 0.0f;
        }
        for (int j = 0; j < k; ++j) da[ids[j]] += (dw[j] - dw_dot_w) * inv_sel;
        for (int64_t e = 0; e < num_experts; ++e) da[e] *= a[e] / (1.0f + std::exp(l[e]));
      }
    }
  }
}

namespace {

// With T = num_tokens: loss = E / (T K) * sum_e count_e * (1 / T) * sum_{n in these rows} probs[n, e],
// from the per-expert mass (sum over the rows). Without tokens (T = 0, so no rows either) both
// losses are 0 rather than 0/0.
template <class Mass>
float aux_loss_from_mass(const Mass* mass, const int64_t* counts, int64_t num_experts, int k, int64_t n_rows,
                         int64_t num_tokens) {
  if (n_rows == 0) return 0.0f;
  double total = 0.0;
  for (int64_t e = 0; e < num_experts; ++e) total += static_cast<double>(counts[e]) * static_cast<double>(mass[e]);
  const double t = static_cast<double>(num_tokens);
  return static_cast<float>(total * static_cast<double>(num_experts) / (t * t * k));
}

// The column sums of probs (N, E), serially in double, row by row: deterministic and cheap next to
// the router GEMM that produced probs.
std::vector<double> column_sums(const Tensor& probs) {
  const int64_t n_rows = probs.dim(0), num_experts = probs.dim(1);
  const float* pp = probs.data<float>();
  std::vector<double> col(num_experts, 0.0);
  for (int64_t n = 0; n < n_rows; ++n)
    for (int64_t e = 0; e < num_experts; ++e) col[e] += pp[n * num_experts + e];
  return col;
}

// (E) scale * d aux loss / d probs[n, e]: the same for every row n.
std::vector<float> aux_loss_grad_row(const int64_t* counts, int64_t num_experts, int k, int64_t num_tokens,
                                     float scale) {
  const double t = static_cast<double>(num_tokens);
  const double c = static_cast<double>(scale) * num_experts / (t * t * k);
  std::vector<float> g(num_experts);
  for (int64_t e = 0; e < num_experts; ++e) g[e] = static_cast<float>(c * static_cast<double>(counts[e]));
  return g;
}

void fill_rows(const std::vector<float>& row, int64_t n_rows, float* out) {
  const int64_t num_experts = std::ssize(row);
#pragma omp parallel for schedule(static) if (n_rows * num_experts > kParallelMinWork)
  for (int64_t n = 0; n < n_rows; ++n)
    for (int64_t e = 0; e < num_experts; ++e) out[n * num_experts + e] = row[e];
}

// logsumexp of each row of logits (N, E).
std::vector<float> row_lses(const Tensor& logits) {
  const int64_t n_rows = logits.dim(0), num_experts = logits.dim(1);
  const float* pl = logits.data<float>();
  std::vector<float> lse(n_rows);
#pragma omp parallel for schedule(static) if (n_rows * num_experts > kParallelMinWork)
  for (int64_t n = 0; n < n_rows; ++n) lse[n] = row_lse(pl + n * num_experts, num_experts);
  return lse;
}

// sum_n lse_n^2 / T, summed serially so the result is independent of the thread count.
float z_loss_from_lse(const float* lse, int64_t n_rows, int64_t num_tokens) {
  double total = 0.0;
  for (int64_t n = 0; n < n_rows; ++n) total += static_cast<double>(lse[n]) * lse[n];
  return n_rows > 0 ? static_cast<float>(total / static_cast<double>(num_tokens)) : 0.0f;
}

// d/dlogits[n, e] of sum_n lse_n^2 / T = 2 lse_n softmax(logits[n])_e / T, scaled and added to
// dlogits; lse (N) given, or nullptr to compute it here.
void add_z_loss_grad(const Tensor& logits, const float* lse_given, int64_t num_tokens, float scale,
                     const Tensor& dlogits) {
  const int64_t n_rows = logits.dim(0);
  const int64_t num_experts = logits.dim(1);
  const float* pl = logits.data<float>();
  float* pd = dlogits.data<float>();
#pragma omp parallel for schedule(static) if (n_rows * num_experts > kParallelMinWork)
  for (int64_t n = 0; n < n_rows; ++n) {
    const float* l = pl + n * num_experts;
    const float lse = lse_given ? lse_given[n] : row_lse(l, num_experts);
    const float c = scale * 2.0f * lse / static_cast<float>(num_tokens);
    for (int64_t e = 0; e < num_experts; ++e) pd[n * num_experts + e] += c * std::exp(l[e] - lse);
  }
}

}  // namespace

void moe_aux_loss_fwd(const Tensor& probs, const Tensor& counts, int k, int64_t num_tokens, const Tensor& loss) {
  const std::vector<double> col = column_sums(probs);
  loss.data<float>()[0] =
      aux_loss_from_mass(col.data(), counts.data<int64_t>(), probs.dim(1), k, probs.dim(0), num_tokens);
}

void moe_aux_loss_bwd(const Tensor& probs, const Tensor& counts, int k, int64_t num_tokens, float scale,
                      const Tensor& dprobs) {
  if (probs.dim(0) == 0) return;
  fill_rows(aux_loss_grad_row(counts.data<int64_t>(), probs.dim(1), k, num_tokens, scale), probs.dim(0),
            dprobs.data<float>());
}

void router_z_loss_fwd(const Tensor& logits, int64_t num_tokens, const Tensor& loss) {
  const std::vector<float> lse = row_lses(logits);
  loss.data<float>()[0] = z_loss_from_lse(lse.data(), logits.dim(0), num_tokens);
}

void router_z_loss_bwd(const Tensor& logits, int64_t num_tokens, float scale, const Tensor& dlogits) {
  add_z_loss_grad(logits, nullptr, num_tokens, scale, dlogits);
}

// ---- the router with its losses in one pass (the same kernels, their results kept) ----

void router_fwd_with_stats(const Tensor& logits, ops::Gating gating, int k, const Tensor& bias, const Tensor& weights,
                           const Tensor& experts, const Tensor& probs, const ops::RouterStats& stats) {
  cpu::router_fwd(logits, gating, k, bias, weights, experts, probs);
  const int64_t num_experts = logits.dim(1);
  const std::vector<double> col = column_sums(probs);
  float* mass = stats.prob_mass.data<float>();
  for (int64_t e = 0; e < num_experts; ++e) mass[e] = static_cast<float>(col[e]);
  int64_t* selected = stats.selected.data<int64_t>();
  std::fill(selected, selected + num_experts, int64_t{0});
  const int32_t* ex = experts.data<int32_t>();
  for (int64_t i = 0; i < experts.numel(); ++i) ++selected[ex[i]];
  const std::vector<float> lse = row_lses(logits);
  std::copy(lse.begin(), lse.end(), stats.lse.data<float>());
}

void moe_aux_loss_fwd_from_stats(const ops::RouterStats& stats, const Tensor& counts, int k, int64_t num_tokens,
                                 const Tensor& loss) {
  loss.data<float>()[0] = aux_loss_from_mass(stats.prob_mass.data<float>(), counts.data<int64_t>(),
                                             stats.prob_mass.numel(), k, stats.lse.numel(), num_tokens);
}

void router_z_loss_fwd_from_stats(const ops::RouterStats& stats, int64_t num_tokens, const Tensor& loss) {
  loss.data<float>()[0] = z_loss_from_lse(stats.lse.data<float>(), stats.lse.numel(), num_tokens);
}

void router_bwd_fused(const Tensor& logits, ops::Gating gating, const Tensor& experts, const Tensor& dweights,
                      const Tensor& dprobs, const ops::RouterLossGrads& losses, const Tensor& dlogits) {
  const int64_t n_rows = logits.dim(0), num_experts = logits.dim(1);
  Tensor dp = dprobs;
  if (losses.counts.defined() && n_rows > 0) {
    const std::vector<float> g =
        aux_loss_grad_row(losses.counts.data<int64_t>(), num_experts, losses.k, losses.num_tokens, losses.aux_scale);
    dp = Tensor::empty({n_rows, num_experts}, DType::kF32);
    fill_rows(g, n_rows, dp.data<float>());
    if (dprobs.defined()) {
      float* pd = dp.data<float>();
      const float* given = dprobs.data<float>();
      for (int64_t i = 0; i < n_rows * num_experts; ++i) pd[i] = given[i] + pd[i];
    }
  }
  cpu::router_bwd(logits, gating, experts, dweights, dp, dlogits);
  if (losses.lse.defined())
    add_z_loss_grad(logits, losses.lse.data<float>(), losses.num_tokens, losses.z_scale, dlogits);
}

}  // namespace moeforge::cpu
