// Fused router gating on the CUDA device, one warp per token: gate scores (softmax or sigmoid),
// top-k selection, renormalisation of the selected weights and the per-token distribution the
// aux loss uses, in one pass over the row; and the backward, also one warp per token. The
// formulas are runtime/cpu/router.cpp's (gradient derivation there); this file replaces the
// thread-per-token kernels of router.cu for router_fwd and router_bwd.
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

namespace moeforge::cuda::launch {
namespace {

constexpr int kWarpsPerBlock = 4;

struct Stats {
  float max, inv_sum;
};

// Softmax statistics of a row over the warp (every lane gets them).
__device__ Stats warp_softmax_stats(const float* l, int64_t e) {
  const int lane = threadIdx.x % kWarp;
  float mx = -INFINITY;
  for (int64_t i = lane; i < e; i += kWarp) mx = fmaxf(mx, l[i]);
  mx = warp_max(mx);
  float sum = 0.0f;
  for (int64_t i = lane; i < e; i += kWarp) sum += expf(l[i] - mx);
  return {mx, 1.0f / warp_sum(sum)};
}

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

__device__ __forceinline__ float gate(const float* l, int64_t i, bool sig, Stats st) {
  return sig ? sigmoid(l[i]) : expf(l[i] - st.max) * st.inv_sum;
}

// (score, id) ordered by score descending, then id ascending: a before b.
__device__ __forceinline__ bool before(float sa, int32_t ia, float sb, int32_t ib) {
  return sa > sb || (sa == sb && ia < ib);
}

__global__ void fused_router_fwd_kernel(const float* logits, int64_t n_rows, int64_t e, bool sig, int k,
                                        const float* bias, float* weights, int32_t* experts, float* probs) {
  const int64_t n = (blockIdx.x * int64_t{blockDim.x} + threadIdx.x) / kWarp;
  if (n >= n_rows) return;
  const int lane = threadIdx.x % kWarp;
  const float* l = logits + n * e;
  float* a = probs + n * e;
  const Stats st = sig ? Stats{0.0f, 1.0f} : warp_softmax_stats(l, e);
  float a_sum = 0.0f;
  for (int64_t i = lane; i < e; i += kWarp) {
    a[i] = gate(l, i, sig, st);
    a_sum += a[i];
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
      const float s = bias ? a[i] + bias[i] : a[i];
      const int32_t id = static_cast<int32_t>(i);
      if (before(prev_s, prev_i, s, id) && (best_i == e || before(s, id, best_s, best_i))) {
        best_s = s;
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
    }
  }
  __syncwarp();
  // Divided, as on the CPU: with k = 1 the weight is exactly 1.
  for (int j = lane; j < k; j += kWarp) weights[n * k + j] /= sel_sum;
  if (sig) {
    const float inv = 1.0f / warp_sum(a_sum);
    for (int64_t i = lane; i < e; i += kWarp) a[i] *= inv;
  }
}

__global__ void fused_router_bwd_kernel(const float* logits, int64_t n_rows, int64_t e, bool sig, int k,
                                        const int32_t* experts, const float* dweights, const float* dprobs,
                                        float* dlogits) {
  const int64_t n = (blockIdx.x * int64_t{blockDim.x} + threadIdx.x) / kWarp;
  if (n >= n_rows) return;
  const int lane = threadIdx.x % kWarp;
  const float* l = logits + n * e;
  const int32_t* ids = experts + n * k;
  const float* dw = dweights + n * k;
  const float* dp = dprobs ? dprobs + n * e : nullptr;
  float* da = dlogits + n * e;
  // A bad expert id makes the row NaN instead of reading out of bounds.
  bool bad = false;
  for (int j = lane; j < k; j += kWarp) bad |= ids[j] < 0 || ids[j] >= e;
  if (__any_sync(0xffffffffu, bad)) {
    for (int64_t i = lane; i < e; i += kWarp) da[i] = NAN;
    return;
  }
  const Stats st = sig ? Stats{0.0f, 1.0f} : warp_softmax_stats(l, e);
  // k is small: every lane computes the selected set's sums itself, in the CPU's order.
  float sel_sum = 0.0f;
  for (int j = 0; j < k; ++j) sel_sum += gate(l, ids[j], sig, st);
  const float inv_sel = 1.0f / sel_sum;
  float dw_dot_w = 0.0f;
  for (int j = 0; j < k; ++j) dw_dot_w += dw[j] * (gate(l, ids[j], sig, st) / sel_sum);

  if (!sig) {
    for (int64_t i = lane; i < e; i += kWarp) da[i] = dp ? dp[i] : 0.0f;
    __syncwarp();
    if (lane == 0)
      for (int j = 0; j < k; ++j) da[ids[j]] += (dw[j] - dw_dot_w) * inv_sel;
    __syncwarp();
    float dot = 0.0f;
    for (int64_t i = lane; i < e; i += kWarp) dot += da[i] * gate(l, i, false, st);
    dot = warp_sum(dot);
    for (int64_t i = lane; i < e; i += kWarp) da[i] = gate(l, i, false, st) * (da[i] - dot);
    return;
  }
  if (dp) {
    float sum = 0.0f;
    for (int64_t i = lane; i < e; i += kWarp) sum += sigmoid(l[i]);
    const float inv = 1.0f / warp_sum(sum);
    float dot = 0.0f;
    for (int64_t i = lane; i < e; i += kWarp) dot += dp[i] * sigmoid(l[i]) * inv;
    dot = warp_sum(dot);
    for (int64_t i = lane; i < e; i += kWarp) da[i] = (dp[i] - dot) * inv;
  } else {
    for (int64_t i = lane; i < e; i += kWarp) da[i] = 0.0f;
  }
  __syncwarp();
  if (lane == 0)
    for (int j = 0; j < k; ++j) da[ids[j]] += (dw[j] - dw_dot_w) * inv_sel;
  __syncwarp();
  // ds * s * (1 - s) with 1 - s = sigmoid(-logit), as on the CPU.
  for (int64_t i = lane; i < e; i += kWarp) da[i] *= sigmoid(l[i]) / (1.0f + expf(l[i]));
}

unsigned warp_blocks(int64_t rows) { return static_cast<unsigned>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock); }

}  // namespace

cudaError_t fused_router_fwd(const float* logits, int64_t n, int64_t e, bool sigmoid, int k, const float* bias,
                             float* weights, int32_t* experts, float* probs, cudaStream_t s) {
  fused_router_fwd_kernel<<<warp_blocks(n), kWarpsPerBlock * kWarp, 0, s>>>(logits, n, e, sigmoid, k, bias, weights,
                                                                          experts, probs);
  return cudaGetLastError();
}

cudaError_t fused_router_bwd(const float* logits, int64_t n, int64_t e, bool sigmoid, int k, const int32_t* experts,
                             const float* dweights, const float* dprobs, float* dlogits, cudaStream_t s) {
  fused_router_bwd_kernel<<<warp_blocks(n), kWarpsPerBlock * kWarp, 0, s>>>(logits, n, e, sigmoid, k, experts,
                                                                          dweights, dprobs, dlogits);
  return cudaGetLastError();
}

}  // namespace moeforge::cuda::launch
