// Fused router gating on the CUDA device, one warp per token: gate scores (softmax or sigmoid),
// top-k selection, renormalisation of the selected weights and the per-token distribution the
// aux loss uses, in one pass over the row, and optionally the router losses' statistics on the
// way (the per-expert probability mass and selected-copy counts of the load-balancing loss, each
// row's logsumexp for the z-loss); and the backward, also one warp per token, which can fold in
// the aux loss's gradient (one row of dprobs shared by all rows) and the z-loss's (from the saved
// lse). The formulas are runtime/cpu/router.cpp's (gradient derivation there).
//
// Statistics, deterministically (launch sizes in routing_plan.h's plan_gating): a block routes a
// fixed range of rows, warp w the rows w, w + warps, ...; each lane adds the probabilities of its
// own experts (lane, lane + 32, ...) into the warp's f64 column in shared memory, so no two
// threads share an accumulator and the order is the row order; lane 0 counts the selections in
// shared int32 counters (integer atomics: order-free). The block then writes the warps' columns
// added in warp order, one partial row per block, and a second kernel adds the blocks' partials
// in block order.
//
// Why a warp per token: a thread-per-token kernel reads each logits row with one thread, so a
// warp touches 32 rows E floats apart per load (uncoalesced) and keeps E serial; with E = 256 the
// row is 8 floats per lane, read coalesced, and the reductions (softmax max and sum, the top-k
// argmax, the dot products of the backward) are warp shuffles.
//
// Top-k: k rounds of a warp argmax in the order (score descending, expert id ascending), each
// round taking the best candidate strictly after the previous pick in that order. For finite
// scores this is exactly the CPU's selection (descending, ties to the lower id). The softmax sum
// runs in the warp's tree order rather than the CPU's row order, so probabilities and weights
// agree with the CPU to f32 rounding.
#include "runtime/cuda/common.cuh"
#include "runtime/cuda/launchers.h"
#include "runtime/cuda/routing_plan.h"

namespace moeforge::cuda::launch {
namespace {

struct Stats {
  float max, sum, inv_sum;
};

// Softmax statistics of a row over the warp (every lane gets them).
__device__ Stats warp_softmax_stats(const float* l, int64_t e) {
  const int lane = threadIdx.x % kWarp;
  float mx = -INFINITY;
  for (int64_t i = lane; i < e; i += kWarp) mx = fmaxf(mx, l[i]);
  mx = warp_max(mx);
  float sum = 0.0f;
  for (int64_t i = lane; i < e; i += kWarp) sum += expf(l[i] - mx);
  sum = warp_sum(sum);
  return {mx, sum, 1.0f / sum};
}

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

__device__ __forceinline__ float gate(const float* l, int64_t i, bool sig, Stats st) {
  return sig ? sigmoid(l[i]) : expf(l[i] - st.max) * st.inv_sum;
}

// (score, id) ordered by score descending, then id ascending: a before b.
__device__ __forceinline__ bool before(float sa, int32_t ia, float sb, int32_t ib) {
  return sa > sb || (sa == sb && ia < ib);
}

// One row with its gate scores in registers (E <= 32 * kPerLane): lane owns experts lane + 32 u.
// The same operations in the same order as the generic path of fused_router_fwd_kernel below
// (so the same results), but the row is read from global memory once and the k argmax rounds
// scan registers instead of re-reading probs. w, ids: the row's (K) outputs; a: its probs row;
// lse_n: its lse (kStats).
template <bool kStats, int kPerLane>
__device__ __forceinline__ void route_row_in_registers(const float* l, int64_t e, bool sig, int k, const float* bias,
                                                       float* w, int32_t* ids, float* a, double* acc,
                                                       int32_t* selected, float* lse_n) {
  const int lane = threadIdx.x % kWarp;
  float g[kPerLane], sc[kPerLane] = {};
  float mx = -INFINITY;
#pragma unroll
  for (int u = 0; u < kPerLane; ++u) {
    const int64_t i = lane + u * kWarp;
    g[u] = i < e ? l[i] : -INFINITY;
    mx = fmaxf(mx, g[u]);
  }
  Stats st{0.0f, 1.0f, 1.0f};
  if (!sig || kStats) {  // as warp_softmax_stats
    mx = warp_max(mx);
    float sum = 0.0f;
#pragma unroll
    for (int u = 0; u < kPerLane; ++u)
      if (lane + u * kWarp < e) sum += expf(g[u] - mx);
    sum = warp_sum(sum);
    st = {mx, sum, 1.0f / sum};
  }
  if (kStats && lane == 0) *lse_n = st.max + logf(st.sum);
  float a_sum = 0.0f;
#pragma unroll
  for (int u = 0; u < kPerLane; ++u) {
    const int64_t i = lane + u * kWarp;
    if (i >= e) continue;
    g[u] = sig ? sigmoid(g[u]) : expf(g[u] - st.max) * st.inv_sum;  // gate()
    a[i] = g[u];
    a_sum += g[u];
    if (kStats && !sig) acc[i] += g[u];
    sc[u] = bias ? g[u] + bias[i] : g[u];
  }
  float prev_s = INFINITY;
  int32_t prev_i = -1;
  float sel_sum = 0.0f;
  for (int j = 0; j < k; ++j) {
    float best_s = -INFINITY, best_g = 0.0f;
    int32_t best_i = static_cast<int32_t>(e);  // none
#pragma unroll
    for (int u = 0; u < kPerLane; ++u) {
      const int32_t id = lane + u * kWarp;
      if (id < e && before(prev_s, prev_i, sc[u], id) && (best_i == e || before(sc[u], id, best_s, best_i))) {
        best_s = sc[u];
        best_i = id;
        best_g = g[u];
      }
    }
    for (int o = kWarp / 2; o > 0; o /= 2) {
      const float os = __shfl_xor_sync(0xffffffffu, best_s, o);
      const int32_t oi = __shfl_xor_sync(0xffffffffu, best_i, o);
      const float og = __shfl_xor_sync(0xffffffffu, best_g, o);
      if (oi != e && (best_i == e || before(os, oi, best_s, best_i))) {
        best_s = os;
        best_i = oi;
        best_g = og;
      }
    }
    const bool none = best_i == e;  // NaN scores, as in the generic path
    if (none) best_i = j;
    prev_s = best_s;
    prev_i = best_i;
    const float aj = none ? NAN : best_g;
    sel_sum += aj;
    if (lane == 0) {
      ids[j] = best_i;
      w[j] = aj;
      if (kStats) atomicAdd(&selected[best_i], 1);
    }
  }
  __syncwarp();
  for (int j = lane; j < k; j += kWarp) w[j] /= sel_sum;
  if (sig) {
    const float inv = 1.0f / warp_sum(a_sum);
#pragma unroll
    for (int u = 0; u < kPerLane; ++u) {
      const int64_t i = lane + u * kWarp;
      if (i >= e) continue;
      const float p = g[u] * inv;
      a[i] = p;
      if (kStats) acc[i] += p;
    }
  }
}

// Block b routes rows [b * rows_per_block, ...), warp w of them the rows w, w + warps, ... With
// kStats, shared memory holds the warps' f64 probability columns (warps x E) and E int32
// selection counters, and the block writes row b of the partial tables; lse[n] receives each
// row's logsumexp. kPerLane > 0: the rows' scores live in registers (route_row_in_registers);
// 0: the generic path for any E, which keeps them in probs.
template <bool kStats, int kPerLane>
__global__ void fused_router_fwd_kernel(const float* logits, int64_t n_rows, int64_t e, bool sig, int k,
                                        const float* bias, float* weights, int32_t* experts, float* probs,
                                        int64_t rows_per_block, double* mass_partial, int32_t* count_partial,
                                        float* lse) {
  extern __shared__ double smem[];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  double* acc = smem + warp * e;  // this warp's column sums (kStats)
  int32_t* selected = reinterpret_cast<int32_t*>(smem + warps * e);
  if constexpr (kStats) {
    for (int64_t j = threadIdx.x; j < warps * e; j += blockDim.x) smem[j] = 0.0;
    for (int64_t j = threadIdx.x; j < e; j += blockDim.x) selected[j] = 0;
    __syncthreads();
  }
  const int64_t row_end = min(n_rows, (blockIdx.x + int64_t{1}) * rows_per_block);
  // n is the same in every lane of a warp: the warp-wide shuffles below see all 32 lanes.
  for (int64_t n = blockIdx.x * rows_per_block + warp; n < row_end; n += warps) {
    const float* l = logits + n * e;
    float* a = probs + n * e;
    if constexpr (kPerLane > 0) {
      route_row_in_registers<kStats, kPerLane>(l, e, sig, k, bias, weights + n * k, experts + n * k, a, acc, selected,
                                               kStats ? lse + n : nullptr);
      continue;
    }
    const Stats st = sig && !kStats ? Stats{0.0f, 1.0f, 1.0f} : warp_softmax_stats(l, e);
    if (kStats && lane == 0) lse[n] = st.max + logf(st.sum);
    float a_sum = 0.0f;
    for (int64_t i = lane; i < e; i += kWarp) {
      const float g = gate(l, i, sig, st);
      a[i] = g;
      a_sum += g;
      if (kStats && !sig) acc[i] += g;  // softmax: the gate score is the final probability
    }
    // Lane i of the warp wrote a[i]; the rounds below read any lane's entries.
    __syncwarp();
    float prev_s = INFINITY;
    int32_t prev_i = -1;
    float sel_sum = 0.0f;
    for (int j = 0; j < k; ++j) {
      float best_s = -INFINITY;
      int32_t best_i = static_cast<int32_t>(e);  // none
      for (int64_t i = lane; i < e; i += kWarp) {
        const float sc = bias ? a[i] + bias[i] : a[i];
        const int32_t id = static_cast<int32_t>(i);
        if (before(prev_s, prev_i, sc, id) && (best_i == e || before(sc, id, best_s, best_i))) {
          best_s = sc;
          best_i = id;
        }
      }
      for (int o = kWarp / 2; o > 0; o /= 2) {
        const float os = __shfl_xor_sync(0xffffffffu, best_s, o);
        const int32_t oi = __shfl_xor_sync(0xffffffffu, best_i, o);
        if (oi != e && (best_i == e || before(os, oi, best_s, best_i))) {
          best_s = os;
          best_i = oi;
        }
      }
      // k <= E (checked by the op), so a round finds no expert only when the scores are NaN: the
      // row then gets valid ids and NaN weights (visible in the loss), as kernels.h promises.
      const bool none = best_i == e;
      if (none) best_i = j;
      prev_s = best_s;
      prev_i = best_i;
      const float aj = none ? NAN : a[best_i];
      sel_sum += aj;
      if (lane == 0) {
        experts[n * k + j] = best_i;
        weights[n * k + j] = aj;
        if (kStats) atomicAdd(&selected[best_i], 1);
      }
    }
    __syncwarp();
    // Divided, as on the CPU: with k = 1 the weight is exactly 1.
    for (int j = lane; j < k; j += kWarp) weights[n * k + j] /= sel_sum;
    if (sig) {
      const float inv = 1.0f / warp_sum(a_sum);
      for (int64_t i = lane; i < e; i += kWarp) {
        const float p = a[i] * inv;  // this lane's own write above: program order
        a[i] = p;
        if (kStats) acc[i] += p;
      }
    }
  }
  if constexpr (kStats) {
    __syncthreads();
    for (int64_t j = threadIdx.x; j < e; j += blockDim.x) {
      double s = 0.0;
      for (int w = 0; w < warps; ++w) s += smem[w * e + j];
      mass_partial[blockIdx.x * e + j] = s;
      count_partial[blockIdx.x * e + j] = selected[j];
    }
  }
}

// Expert j: the blocks' partials in block order.
__global__ void router_stats_reduce_kernel(const double* mass_partial, const int32_t* count_partial, int64_t blocks,
                                           int64_t e, float* prob_mass, int64_t* selected) {
  const int64_t j = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (j >= e) return;
  double m = 0.0;
  int64_t c = 0;
  for (int64_t b = 0; b < blocks; ++b) {
    m += mass_partial[b * e + j];
    c += count_partial[b * e + j];
  }
  prob_mass[j] = static_cast<float>(m);
  selected[j] = c;
}

// dL/dprobs[n, i]: the given rows' gradient plus the row shared by all rows (each optional).
// With only the shared row this is exactly its value (0 + g), as the CPU's materialised dprobs.
__device__ __forceinline__ float dprob(const float* dp, const float* dp_row, int64_t i) {
  return (dp ? dp[i] : 0.0f) + (dp_row ? dp_row[i] : 0.0f);
}

__global__ void fused_router_bwd_kernel(const float* logits, int64_t n_rows, int64_t e, bool sig, int k,
                                        const int32_t* experts, const float* dweights, const float* dprobs,
                                        const float* dprobs_row, const float* lse, float z_scale, int64_t num_tokens,
                                        float* dlogits) {
  const int64_t n = (blockIdx.x * int64_t{blockDim.x} + threadIdx.x) / kWarp;
  if (n >= n_rows) return;  // whole warps: n is the same in every lane
  const int lane = threadIdx.x % kWarp;
  const float* l = logits + n * e;
  const int32_t* ids = experts + n * k;
  const float* dw = dweights + n * k;
  const float* dp = dprobs ? dprobs + n * e : nullptr;
  const bool any_dp = dp || dprobs_row;
  float* da = dlogits + n * e;
  // A bad expert id makes the row NaN instead of reading out of bounds.
  bool bad = false;
  for (int j = lane; j < k; j += kWarp) bad |= ids[j] < 0 || ids[j] >= e;
  if (__any_sync(0xffffffffu, bad)) {
    for (int64_t i = lane; i < e; i += kWarp) da[i] = NAN;
    return;
  }
  // The z-loss term, router_z_loss_bwd's formula with the forward's lse: added to the router
  // gradient once that is final, as the CPU adds it to router_bwd's output.
  const float z_lse = lse ? lse[n] : 0.0f;
  const float zc = z_scale * 2.0f * z_lse / static_cast<float>(num_tokens);
  const auto z_term = [&](int64_t i) { return lse ? zc * expf(l[i] - z_lse) : 0.0f; };

  const Stats st = sig ? Stats{0.0f, 1.0f, 1.0f} : warp_softmax_stats(l, e);
  // k is small: every lane computes the selected set's sums itself, in the CPU's order.
  float sel_sum = 0.0f;
  for (int j = 0; j < k; ++j) sel_sum += gate(l, ids[j], sig, st);
  const float inv_sel = 1.0f / sel_sum;
  float dw_dot_w = 0.0f;
  for (int j = 0; j < k; ++j) dw_dot_w += dw[j] * (gate(l, ids[j], sig, st) / sel_sum);

  if (!sig) {
    for (int64_t i = lane; i < e; i += kWarp) da[i] = any_dp ? dprob(dp, dprobs_row, i) : 0.0f;
    __syncwarp();
    if (lane == 0)
      for (int j = 0; j < k; ++j) da[ids[j]] += (dw[j] - dw_dot_w) * inv_sel;
    __syncwarp();
    float dot = 0.0f;
    for (int64_t i = lane; i < e; i += kWarp) dot += da[i] * gate(l, i, false, st);
    dot = warp_sum(dot);
    for (int64_t i = lane; i < e; i += kWarp) {
      const float g = gate(l, i, false, st) * (da[i] - dot);
      da[i] = lse ? g + z_term(i) : g;
    }
    return;
  }
  if (any_dp) {
    float sum = 0.0f;
    for (int64_t i = lane; i < e; i += kWarp) sum += sigmoid(l[i]);
    const float inv = 1.0f / warp_sum(sum);
    float dot = 0.0f;
    for (int64_t i = lane; i < e; i += kWarp) dot += dprob(dp, dprobs_row, i) * sigmoid(l[i]) * inv;
    dot = warp_sum(dot);
    for (int64_t i = lane; i < e; i += kWarp) da[i] = (dprob(dp, dprobs_row, i) - dot) * inv;
  } else {
    for (int64_t i = lane; i < e; i += kWarp) da[i] = 0.0f;
  }
  __syncwarp();
  if (lane == 0)
    for (int j = 0; j < k; ++j) da[ids[j]] += (dw[j] - dw_dot_w) * inv_sel;
  __syncwarp();
  // ds * s * (1 - s) with 1 - s = sigmoid(-logit), as on the CPU.
  for (int64_t i = lane; i < e; i += kWarp) {
    const float g = da[i] * (sigmoid(l[i]) / (1.0f + expf(l[i])));
    da[i] = lse ? g + z_term(i) : g;
  }
}

}  // namespace

namespace {

template <bool kStats, int kPerLane>
void launch_fwd(const routing::GatingPlan& p, const float* logits, int64_t n, int64_t e, bool sigmoid, int k,
                const float* bias, float* weights, int32_t* experts, float* probs, const RouterStatsBuffers* stats,
                cudaStream_t s) {
  fused_router_fwd_kernel<kStats, kPerLane><<<static_cast<unsigned>(p.blocks), p.warps * kWarp, p.smem_bytes, s>>>(
      logits, n, e, sigmoid, k, bias, weights, experts, probs, p.rows_per_block,
      stats ? stats->mass_partial : nullptr, stats ? stats->count_partial : nullptr, stats ? stats->lse : nullptr);
}

template <bool kStats>
void launch_fwd_for_width(const routing::GatingPlan& p, const float* logits, int64_t n, int64_t e, bool sigmoid,
                          int k, const float* bias, float* weights, int32_t* experts, float* probs,
                          const RouterStatsBuffers* stats, cudaStream_t s) {
  switch (routing::gating_lane_values(e)) {
    case 1:
      return launch_fwd<kStats, 1>(p, logits, n, e, sigmoid, k, bias, weights, experts, probs, stats, s);
    case 2:
      return launch_fwd<kStats, 2>(p, logits, n, e, sigmoid, k, bias, weights, experts, probs, stats, s);
    case 4:
      return launch_fwd<kStats, 4>(p, logits, n, e, sigmoid, k, bias, weights, experts, probs, stats, s);
    case 8:
      return launch_fwd<kStats, 8>(p, logits, n, e, sigmoid, k, bias, weights, experts, probs, stats, s);
    default:
      return launch_fwd<kStats, 0>(p, logits, n, e, sigmoid, k, bias, weights, experts, probs, stats, s);
  }
}

}  // namespace

cudaError_t fused_router_fwd(const float* logits, int64_t n, int64_t e, bool sigmoid, int k, const float* bias,
                             float* weights, int32_t* experts, float* probs, const RouterStatsBuffers* stats,
                             cudaStream_t s) {
  const routing::GatingPlan p = routing::plan_gating(n, e, stats != nullptr);
  if (!stats) {
    if (p.blocks > 0)
      launch_fwd_for_width<false>(p, logits, n, e, sigmoid, k, bias, weights, experts, probs, nullptr, s);
    return cudaGetLastError();
  }
  if (p.blocks > 0) launch_fwd_for_width<true>(p, logits, n, e, sigmoid, k, bias, weights, experts, probs, stats, s);
  // With no rows the reduction writes zeros.
  const unsigned reduce_blocks = static_cast<unsigned>((e + 127) / 128);
  router_stats_reduce_kernel<<<reduce_blocks, 128, 0, s>>>(stats->mass_partial, stats->count_partial, p.blocks, e,
                                                           stats->prob_mass, stats->selected);
  return cudaGetLastError();
}

cudaError_t fused_router_bwd(const float* logits, int64_t n, int64_t e, bool sigmoid, int k, const int32_t* experts,
                             const float* dweights, const float* dprobs, const float* dprobs_row, const float* lse,
                             float z_scale, int64_t num_tokens, float* dlogits, cudaStream_t s) {
  const routing::GatingPlan p = routing::plan_gating(n, e, false);
  if (p.blocks > 0)
    fused_router_bwd_kernel<<<static_cast<unsigned>(p.blocks), p.warps * kWarp, 0, s>>>(
        logits, n, e, sigmoid, k, experts, dweights, dprobs, dprobs_row, lse, z_scale, num_tokens, dlogits);
  return cudaGetLastError();
}

}  // namespace moeforge::cuda::launch
