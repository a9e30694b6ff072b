// CUDA kernels of the router's loss terms (formulas in runtime/cpu/router.cpp): the
// load-balancing loss and the z-loss, forward and backward. The gating itself is the fused
// router (fused_router.cu). The loss reductions (over rows) run in a fixed order: a column sum
// per expert thread, then one thread adding the experts in order.
#include "runtime/cuda/common.cuh"
#include "runtime/cuda/launchers.h"

namespace moeforge::cuda::launch {
namespace {

constexpr int kThreads = 128;

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
