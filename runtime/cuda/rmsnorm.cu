// CUDA RMSNorm forward and backward (formulas in runtime/cpu/rmsnorm.cpp). One block per row for
// the row reductions; dw is reduced over fixed chunks of kChunkRows rows into (chunks, C)
// partials, which a second kernel adds in chunk order: deterministic, no atomics.
#include "runtime/cuda/common.cuh"
#include "runtime/cuda/launchers.h"

namespace moeforge::cuda::launch {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunkRows = 64;

int row_threads(int64_t c) { return static_cast<int>(std::max<int64_t>(kWarp, std::min<int64_t>(kThreads, (c + 31) / 32 * 32))); }

__global__ void rmsnorm_fwd_kernel(const float* x, const float* w, float eps, float* out, float* rstd, int64_t c) {
  __shared__ float scratch[32];
  const float* xi = x + blockIdx.x * c;
  float* oi = out + blockIdx.x * c;
  float ss = 0.0f;
  for (int64_t j = threadIdx.x; j < c; j += blockDim.x) ss += xi[j] * xi[j];
  ss = block_sum(ss, scratch);
  const float r = rsqrtf(ss / static_cast<float>(c) + eps);
  if (threadIdx.x == 0) rstd[blockIdx.x] = r;
  for (int64_t j = threadIdx.x; j < c; j += blockDim.x) oi[j] = xi[j] * r * w[j];
}

__global__ void rmsnorm_dx_kernel(const float* x, const float* w, const float* rstd, const float* dout, float* dx,
                                  int64_t c) {
  __shared__ float scratch[32];
  const float* xi = x + blockIdx.x * c;
  const float* di = dout + blockIdx.x * c;
  float* dxi = dx + blockIdx.x * c;
  const float r = rstd[blockIdx.x];
  float gx = 0.0f;
  for (int64_t j = threadIdx.x; j < c; j += blockDim.x) gx += w[j] * di[j] * xi[j];
  gx = block_sum(gx, scratch);
  const float coef = r * r * r * gx / static_cast<float>(c);
  for (int64_t j = threadIdx.x; j < c; j += blockDim.x) dxi[j] = r * w[j] * di[j] - xi[j] * coef;
}

// partial[chunk, j] = sum over the chunk's rows of dout * x * rstd.
__global__ void rmsnorm_dw_partial_kernel(const float* x, const float* rstd, const float* dout, float* partial,
                                          int64_t n, int64_t c) {
  const int64_t j = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (j >= c) return;
  const int64_t begin = blockIdx.y * kChunkRows, end = min(n, begin + kChunkRows);
  float s = 0.0f;
  for (int64_t i = begin; i < end; ++i) s += dout[i * c + j] * x[i * c + j] * rstd[i];
  partial[blockIdx.y * c + j] = s;
}

__global__ void rmsnorm_dw_sum_kernel(const float* partial, int64_t chunks, float* dw, int64_t c) {
  const int64_t j = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (j >= c) return;
  float s = 0.0f;
  for (int64_t b = 0; b < chunks; ++b) s += partial[b * c + j];
  dw[j] += s;
}

}  // namespace

cudaError_t rmsnorm_fwd(const float* x, const float* w, float eps, float* out, float* rstd, int64_t n, int64_t c,
                        cudaStream_t s) {
  rmsnorm_fwd_kernel<<<static_cast<unsigned>(n), row_threads(c), 0, s>>>(x, w, eps, out, rstd, c);
  return cudaGetLastError();
}

int64_t rmsnorm_bwd_chunks(int64_t n) { return (n + kChunkRows - 1) / kChunkRows; }

cudaError_t rmsnorm_bwd(const float* x, const float* w, const float* rstd, const float* dout, float* dx, float* dw,
                        int64_t n, int64_t c, float* partial, cudaStream_t s) {
  rmsnorm_dx_kernel<<<static_cast<unsigned>(n), row_threads(c), 0, s>>>(x, w, rstd, dout, dx, c);
  const unsigned col_blocks = static_cast<unsigned>((c + kThreads - 1) / kThreads);
  rmsnorm_dw_partial_kernel<<<dim3(col_blocks, static_cast<unsigned>(rmsnorm_bwd_chunks(n))), kThreads, 0, s>>>(
      x, rstd, dout, partial, n, c);
  rmsnorm_dw_sum_kernel<<<col_blocks, kThreads, 0, s>>>(partial, rmsnorm_bwd_chunks(n), dw, c);
  return cudaGetLastError();
}

}  // namespace moeforge::cuda::launch
