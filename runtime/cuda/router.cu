// CUDA router top-k gating, its backward, and the router's loss terms (formulas and tie rules in
// runtime/cpu/router.cpp, which these kernels follow step for step, so both backends select the
// same experts).
//
// One thread per token: E is at most a few hundred and K a handful, so a token's work is small
// and the row reads are cached. The forward uses the token's probs row for the gate scores and
// its weights row as the top-k scratch, exactly as the CPU kernel does; the backward recomputes
// the gate scores on the fly. The loss reductions (over rows) run in a fixed order: a column sum
// per expert thread, then one thread adding the experts in order.
#include "runtime/cuda/common.cuh"
#include "runtime/cuda/launchers.h"

namespace moeforge::cuda::launch {
namespace {

constexpr int kThreads = 128;

struct Softmax {
  float max, inv_sum;
};

__device__ Softmax softmax_stats(const float* l, int64_t e) {
  float mx = l[0];
  for (int64_t i = 1; i < e; ++i) mx = fmaxf(mx, l[i]);
  float sum = 0.0f;
  for (int64_t i = 0; i < e; ++i) sum += expf(l[i] - mx);
  return {mx, 1.0f / sum};
}

__device__ __forceinline__ float gate_score(const float* l, int64_t i, bool sigmoid, Softmax st) {
  return sigmoid ? 1.0f / (1.0f + expf(-l[i])) : expf(l[i] - st.max) * st.inv_sum;
}

__global__ void router_fwd_kernel(const float* logits, int64_t n_rows, int64_t e, bool sigmoid, int k,
                                  const float* bias, float* weights, int32_t* experts, float* probs) {
  const int64_t n = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (n >= n_rows) return;
  const float* l = logits + n * e;
  float* a = probs + n * e;
  int32_t* ids = experts + n * k;
  float* top = weights + n * k;
  const Softmax st = sigmoid ? Softmax{0.0f, 1.0f} : softmax_stats(l, e);
  for (int64_t i = 0; i < e; ++i) a[i] = gate_score(l, i, sigmoid, st);
  // Insertion into a descending top-k list; an entry moves ahead only of strictly smaller ones,
  // so ties keep the lower expert id first, and a NaN still fills an empty slot.
  int filled = 0;
  for (int64_t i = 0; i < e; ++i) {
    const float s = bias ? a[i] + bias[i] : a[i];
    if (filled == k && !(s > top[k - 1])) continue;
    int j = filled < k ? filled : k - 1;
    while (j > 0 && s > top[j - 1]) {
      top[j] = top[j - 1];
      ids[j] = ids[j - 1];
      --j;
    }
    top[j] = s;
    ids[j] = static_cast<int32_t>(i);
    if (filled < k) ++filled;
  }
  float sel_sum = 0.0f;
  for (int j = 0; j < k; ++j) sel_sum += a[ids[j]];
  const float inv_sel = 1.0f / sel_sum;
  for (int j = 0; j < k; ++j) top[j] = a[ids[j]] * inv_sel;
  if (sigmoid) {
    float sum = 0.0f;
    for (int64_t i = 0; i < e; ++i) sum += a[i];
    const float inv = 1.0f / sum;
    for (int64_t i = 0; i < e; ++i) a[i] *= inv;
  }
}

__global__ void router_bwd_kernel(const float* logits, int64_t n_rows, int64_t e, bool sigmoid, int k,
                                  const int32_t* experts, const float* dweights, const float* dprobs,
                                  float* dlogits) {
  const int64_t n = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (n >= n_rows) return;
  const float* l = logits + n * e;
  const int32_t* ids = experts + n * k;
  const float* dw = dweights + n * k;
  const float* dp = dprobs ? dprobs + n * e : nullptr;
  float* da = dlogits + n * e;
  const Softmax st = sigmoid ? Softmax{0.0f, 1.0f} : softmax_stats(l, e);
  // A bad expert id makes the row NaN instead of reading out of bounds.
  for (int j = 0; j < k; ++j)
    if (ids[j] < 0 || ids[j] >= e) {
      for (int64_t i = 0; i < e; ++i) da[i] = NAN;
      return;
    }
  float sel_sum = 0.0f;
  for (int j = 0; j < k; ++j) sel_sum += gate_score(l, ids[j], sigmoid, st);
  const float inv_sel = 1.0f / sel_sum;
  float dw_dot_w = 0.0f;
  for (int j = 0; j < k; ++j) dw_dot_w += dw[j] * gate_score(l, ids[j], sigmoid, st) * inv_sel;
  if (!sigmoid) {
    for (int64_t i = 0; i < e; ++i) da[i] = dp ? dp[i] : 0.0f;
    for (int j = 0; j < k; ++j) da[ids[j]] += (dw[j] - dw_dot_w) * inv_sel;
    float da_dot_p = 0.0f;
    for (int64_t i = 0; i < e; ++i) da_dot_p += da[i] * gate_score(l, i, false, st);
    for (int64_t i = 0; i < e; ++i) da[i] = gate_score(l, i, false, st) * (da[i] - da_dot_p);
    return;
  }
  if (dp) {
    float sum = 0.0f;
    for (int64_t i = 0; i < e; ++i) sum += gate_score(l, i, true, st);
    const float inv = 1.0f / sum;
    float dp_dot_probs = 0.0f;
    for (int64_t i = 0; i < e; ++i) dp_dot_probs += dp[i] * gate_score(l, i, true, st) * inv;
    for (int64_t i = 0; i < e; ++i) da[i] = (dp[i] - dp_dot_probs) * inv;
  } else {
    for (int64_t i = 0; i < e; ++i) da[i] = 0.0f;
  }
  for (int j = 0; j < k; ++j) da[ids[j]] += (dw[j] - dw_dot_w) * inv_sel;
  // ds * s * (1 - s) with 1 - s = sigmoid(-logit), as on the CPU.
  for (int64_t i = 0; i < e; ++i) da[i] *= gate_score(l, i, true, st) / (1.0f + expf(l[i]));
}

// col[e] = sum over rows of probs[n, e], in double, row by row.
__global__ void aux_columns_kernel(const float* probs, int64_t n_rows, int64_t e, double* col) {
  const int64_t j = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (j >= e) return;
  double s = 0.0;
  for (int64_t n = 0; n < n_rows; ++n) s += probs[n * e + j];
  col[j] = s;
}

__global__ void aux_total_kernel(const double* col, const int64_t* counts, int64_t n_rows, int64_t e, int k,
                                 int64_t num_tokens, float* loss) {
  double total = 0.0;
  if (n_rows > 0) {
    for (int64_t j = 0; j < e; ++j) total += static_cast<double>(counts[j]) * col[j];
    const double t = static_cast<double>(num_tokens);
    total *= static_cast<double>(e) / (t * t * k);
  }
  *loss = static_cast<float>(total);
}

__global__ void aux_bwd_kernel(const int64_t* counts, int64_t n_rows, int64_t e, double c, float* dprobs) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n_rows * e; i += int64_t{gridDim.x} * blockDim.x)
    dprobs[i] = static_cast<float>(c * static_cast<double>(counts[i % e]));
}

__device__ float row_lse(const float* x, int64_t e) {
  float mx = x[0];
  for (int64_t i = 1; i < e; ++i) mx = fmaxf(mx, x[i]);
  float sum = 0.0f;
  for (int64_t i = 0; i < e; ++i) sum += expf(x[i] - mx);
  return mx + logf(sum);
}

__global__ void z_lse_kernel(const float* logits, int64_t n_rows, int64_t e, float* lse) {
  const int64_t n = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (n < n_rows) lse[n] = row_lse(logits + n * e, e);
}

// One block: thread-strided partial sums in double, then a fixed tree.
__global__ void z_total_kernel(const float* lse, int64_t n_rows, int64_t num_tokens, float* loss) {
  __shared__ double scratch[32];
  double s = 0.0;
  for (int64_t n = threadIdx.x; n < n_rows; n += blockDim.x) s += static_cast<double>(lse[n]) * lse[n];
  s = block_sum(s, scratch);
  if (threadIdx.x == 0) *loss = n_rows > 0 ? static_cast<float>(s / static_cast<double>(num_tokens)) : 0.0f;
}

__global__ void z_bwd_kernel(const float* logits, int64_t n_rows, int64_t e, int64_t num_tokens, float scale,
                             float* dlogits) {
  const int64_t n = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (n >= n_rows) return;
  const float* l = logits + n * e;
  const float lse = row_lse(l, e);
  const float c = scale * 2.0f * lse / static_cast<float>(num_tokens);
  for (int64_t i = 0; i < e; ++i) dlogits[n * e + i] += c * expf(l[i] - lse);
}

unsigned blocks(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

}  // namespace

cudaError_t router_fwd(const float* logits, int64_t n, int64_t e, bool sigmoid, int k, const float* bias,
                       float* weights, int32_t* experts, float* probs, cudaStream_t s) {
  router_fwd_kernel<<<blocks(n), kThreads, 0, s>>>(logits, n, e, sigmoid, k, bias, weights, experts, probs);
  return cudaGetLastError();
}

cudaError_t router_bwd(const float* logits, int64_t n, int64_t e, bool sigmoid, int k, const int32_t* experts,
                       const float* dweights, const float* dprobs, float* dlogits, cudaStream_t s) {
  router_bwd_kernel<<<blocks(n), kThreads, 0, s>>>(logits, n, e, sigmoid, k, experts, dweights, dprobs, dlogits);
  return cudaGetLastError();
}

cudaError_t moe_aux_loss_fwd(const float* probs, const int64_t* counts, int64_t n, int64_t e, int k,
                             int64_t num_tokens, float* loss, double* scratch, cudaStream_t s) {
  aux_columns_kernel<<<blocks(e), kThreads, 0, s>>>(probs, n, e, scratch);
  aux_total_kernel<<<1, 1, 0, s>>>(scratch, counts, n, e, k, num_tokens, loss);
  return cudaGetLastError();
}

cudaError_t moe_aux_loss_bwd(const int64_t* counts, int64_t n, int64_t e, int k, int64_t num_tokens, float scale,
                             float* dprobs, cudaStream_t s) {
  const double t = static_cast<double>(num_tokens);
  const double c = static_cast<double>(scale) * static_cast<double>(e) / (t * t * k);
  aux_bwd_kernel<<<grid_for(n * e, kThreads), kThreads, 0, s>>>(counts, n, e, c, dprobs);
  return cudaGetLastError();
}

cudaError_t router_z_loss_fwd(const float* logits, int64_t n, int64_t e, int64_t num_tokens, float* loss,
                              float* scratch, cudaStream_t s) {
  if (n > 0) z_lse_kernel<<<blocks(n), kThreads, 0, s>>>(logits, n, e, scratch);
  z_total_kernel<<<1, 256, 0, s>>>(scratch, n, num_tokens, loss);
  return cudaGetLastError();
}

cudaError_t router_z_loss_bwd(const float* logits, int64_t n, int64_t e, int64_t num_tokens, float scale,
                              float* dlogits, cudaStream_t s) {
  z_bwd_kernel<<<blocks(n), kThreads, 0, s>>>(logits, n, e, num_tokens, scale, dlogits);
  return cudaGetLastError();
}

}  // namespace moeforge::cuda::launch
