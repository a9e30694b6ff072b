// CUDA kernels of the router's loss terms (formulas in runtime/cpu/router.cpp): the
// load-balancing loss and the z-loss, forward and backward, from the catalog's inputs (probs,
// logits) or from the statistics the fused gating saved (fused_router.cu: the per-expert
// probability mass, the rows' lse). Every reduction runs in a fixed order, so the losses are
// reproducible: the aux loss's column sums per (row block, expert) in row order, then the row
// blocks in order (routing::plan_column_sums), then the experts in a fixed tree; the z-loss's
// lse^2 in a fixed tree over one block.
#include "runtime/cuda/common.cuh"
#include "runtime/cuda/launchers.h"
#include "runtime/cuda/routing_plan.h"

namespace moeforge::cuda::launch {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = 4;

// partial[b, j] = sum over the rows of row block b of probs[n, j], in double, row by row.
__global__ void aux_partial_kernel(const float* probs, int64_t n_rows, int64_t e, int64_t rows_per_block,
                                   double* partial) {
  const int64_t j = blockIdx.y * int64_t{routing::kColumnThreads} + threadIdx.x;
  if (j >= e) return;
  const int64_t begin = blockIdx.x * rows_per_block, end = min(n_rows, begin + rows_per_block);
  double s = 0.0;
  for (int64_t n = begin; n < end; ++n) s += probs[n * e + j];
  partial[blockIdx.x * e + j] = s;
}

// col[j] = the row blocks' partials of column j, in block order.
__global__ void aux_columns_kernel(const double* partial, int64_t row_blocks, int64_t e, double* col) {
  const int64_t j = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (j >= e) return;
  double s = 0.0;
  for (int64_t b = 0; b < row_blocks; ++b) s += partial[b * e + j];
  col[j] = s;
}

// One block: loss = E / (T^2 K) * sum_j counts_j * mass_j, the experts in a fixed tree. mass is
// f64 (aux_loss_fwd) or f32 (the fused gating's prob_mass).
template <class M>
__global__ void aux_total_kernel(const M* mass, const int64_t* counts, int64_t n_rows, int64_t e, int k,
                                 int64_t num_tokens, float* loss) {
  __shared__ double scratch[32];
  double s = 0.0;
  for (int64_t j = threadIdx.x; j < e; j += blockDim.x) s += static_cast<double>(counts[j]) * static_cast<double>(mass[j]);
  s = block_sum(s, scratch);
  if (threadIdx.x != 0) return;
  double total = 0.0;
  if (n_rows > 0) {  // no rows (and possibly T = 0): 0, not 0/0
    const double t = static_cast<double>(num_tokens);
    total = s * static_cast<double>(e) / (t * t * k);
  }
  *loss = static_cast<float>(total);
}

__global__ void aux_bwd_kernel(const int64_t* counts, int64_t n_rows, int64_t e, double c, float* dprobs) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n_rows * e; i += int64_t{gridDim.x} * blockDim.x)
    dprobs[i] = static_cast<float>(c * static_cast<double>(counts[i % e]));
}

// logsumexp of a row over the warp (every lane gets it), reading the row coalesced.
__device__ float warp_row_lse(const float* x, int64_t e) {
  const int lane = threadIdx.x % kWarp;
  float mx = -INFINITY;
  for (int64_t i = lane; i < e; i += kWarp) mx = fmaxf(mx, x[i]);
  mx = warp_max(mx);
  float sum = 0.0f;
  for (int64_t i = lane; i < e; i += kWarp) sum += expf(x[i] - mx);
  return mx + logf(warp_sum(sum));
}

// One warp per row.
__global__ void z_lse_kernel(const float* logits, int64_t n_rows, int64_t e, float* lse) {
  const int64_t n = (blockIdx.x * int64_t{blockDim.x} + threadIdx.x) / kWarp;
  if (n >= n_rows) return;
  const float v = warp_row_lse(logits + n * e, e);
  if (threadIdx.x % kWarp == 0) lse[n] = v;
}

// One block: thread-strided partial sums in double, then a fixed tree.
__global__ void z_total_kernel(const float* lse, int64_t n_rows, int64_t num_tokens, float* loss) {
  __shared__ double scratch[32];
  double s = 0.0;
  for (int64_t n = threadIdx.x; n < n_rows; n += blockDim.x) s += static_cast<double>(lse[n]) * lse[n];
  s = block_sum(s, scratch);
  if (threadIdx.x == 0) *loss = n_rows > 0 ? static_cast<float>(s / static_cast<double>(num_tokens)) : 0.0f;
}

// One warp per row: dlogits += scale * 2 lse / T * softmax(logits).
__global__ void z_bwd_kernel(const float* logits, int64_t n_rows, int64_t e, int64_t num_tokens, float scale,
                             float* dlogits) {
  const int64_t n = (blockIdx.x * int64_t{blockDim.x} + threadIdx.x) / kWarp;
  if (n >= n_rows) return;
  const float* l = logits + n * e;
  const float lse = warp_row_lse(l, e);
  const float c = scale * 2.0f * lse / static_cast<float>(num_tokens);
  for (int64_t i = threadIdx.x % kWarp; i < e; i += kWarp) dlogits[n * e + i] += c * expf(l[i] - lse);
}

unsigned warp_blocks(int64_t rows) { return static_cast<unsigned>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock); }

}  // namespace

cudaError_t moe_aux_loss_fwd(const float* probs, const int64_t* counts, int64_t n, int64_t e, int k,
                             int64_t num_tokens, float* loss, double* scratch, cudaStream_t s) {
  const routing::ColumnPlan p = routing::plan_column_sums(n, e);
  double* partial = scratch;
  double* col = scratch + p.row_blocks * e;
  if (p.row_blocks > 0) {
    const dim3 grid(static_cast<unsigned>(p.row_blocks), static_cast<unsigned>(p.column_blocks));
    aux_partial_kernel<<<grid, routing::kColumnThreads, 0, s>>>(probs, n, e, p.rows_per_block, partial);
    aux_columns_kernel<<<static_cast<unsigned>(p.column_blocks), routing::kColumnThreads, 0, s>>>(partial, p.row_blocks,
                                                                                                e, col);
  }
  aux_total_kernel<double><<<1, kThreads, 0, s>>>(col, counts, n, e, k, num_tokens, loss);
  return cudaGetLastError();
}

cudaError_t moe_aux_loss_fwd_from_mass(const float* prob_mass, const int64_t* counts, int64_t n, int64_t e, int k,
                                       int64_t num_tokens, float* loss, cudaStream_t s) {
  aux_total_kernel<float><<<1, kThreads, 0, s>>>(prob_mass, counts, n, e, k, num_tokens, loss);
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
  if (n > 0) z_lse_kernel<<<warp_blocks(n), kWarpsPerBlock * kWarp, 0, s>>>(logits, n, e, scratch);
  z_total_kernel<<<1, kThreads, 0, s>>>(scratch, n, num_tokens, loss);
  return cudaGetLastError();
}

cudaError_t router_z_loss_fwd_from_lse(const float* lse, int64_t n, int64_t num_tokens, float* loss, cudaStream_t s) {
  z_total_kernel<<<1, kThreads, 0, s>>>(lse, n, num_tokens, loss);
  return cudaGetLastError();
}

cudaError_t router_z_loss_bwd(const float* logits, int64_t n, int64_t e, int64_t num_tokens, float scale,
                              float* dlogits, cudaStream_t s) {
  z_bwd_kernel<<<warp_blocks(n), kWarpsPerBlock * kWarp, 0, s>>>(logits, n, e, num_tokens, scale, dlogits);
  return cudaGetLastError();
}

}  // namespace moeforge::cuda::launch
