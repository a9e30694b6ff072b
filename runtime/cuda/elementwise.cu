// CUDA elementwise ops, the sum of squares and dtype casts: grid-stride loops, memory bound.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "runtime/cuda/common.cuh"
#include "runtime/cuda/launchers.h"

namespace moeforge::cuda::launch {
namespace {

constexpr int kThreads = 256;
// sum_squares: partial sums of a fixed number of blocks, added by one block in block order.
constexpr int kSumBlocks = kSumSquaresScratch - 1;

template <class T>
__global__ void fill_kernel(T* p, int64_t n, T value) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x)
    p[i] = value;
}

__global__ void add_kernel(const float* a, const float* b, float* out, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x)
    out[i] = a[i] + b[i];
}

__global__ void axpy_kernel(float* dst, const float* src, float alpha, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x)
    dst[i] += alpha * src[i];
}

__global__ void scale_kernel(float* p, float alpha, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x)
    p[i] *= alpha;
}

// Each block sums a fixed grid-stride slice in double; the per-block results are then added in
// block order by sum_partials_kernel: the same bits on every run.
__global__ void sum_squares_kernel(const float* p, int64_t n, double* partial) {
  __shared__ double scratch[32];
  double s = 0.0;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x)
    s += static_cast<double>(p[i]) * p[i];
  s = block_sum(s, scratch);
  if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

__global__ void sum_partials_kernel(const double* partial, int count, double* out) {
  __shared__ double scratch[32];
  double s = 0.0;
  for (int i = threadIdx.x; i < count; i += blockDim.x) s += partial[i];
  s = block_sum(s, scratch);
  if (threadIdx.x == 0) *out = s;
}

template <class S, class D>
__global__ void cast_kernel(const S* src, D* dst, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x)
    dst[i] = from_f32<D>(to_f32(src[i]));
}

template <class S>
cudaError_t cast_from(const S* src, void* dst, DType dst_dtype, int64_t n, cudaStream_t s) {
  const unsigned g = grid_for(n, kThreads);
  switch (dst_dtype) {
    case DType::kF32: cast_kernel<<<g, kThreads, 0, s>>>(src, static_cast<float*>(dst), n); break;
    case DType::kBF16: cast_kernel<<<g, kThreads, 0, s>>>(src, static_cast<__nv_bfloat16*>(dst), n); break;
    case DType::kF16: cast_kernel<<<g, kThreads, 0, s>>>(src, static_cast<__half*>(dst), n); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t fill(void* p, DType dtype, int64_t n, float value, cudaStream_t s) {
  const unsigned g = grid_for(n, kThreads);
  switch (dtype) {
    case DType::kF32: fill_kernel<<<g, kThreads, 0, s>>>(static_cast<float*>(p), n, value); break;
    case DType::kBF16:
      fill_kernel<<<g, kThreads, 0, s>>>(static_cast<__nv_bfloat16*>(p), n, __float2bfloat16_rn(value));
      break;
    case DType::kF16: fill_kernel<<<g, kThreads, 0, s>>>(static_cast<__half*>(p), n, __float2half_rn(value)); break;
    case DType::kI32: fill_kernel<<<g, kThreads, 0, s>>>(static_cast<int32_t*>(p), n, static_cast<int32_t>(value)); break;
    case DType::kI64: fill_kernel<<<g, kThreads, 0, s>>>(static_cast<int64_t*>(p), n, static_cast<int64_t>(value)); break;
  }
  return cudaGetLastError();
}

cudaError_t add(const float* a, const float* b, float* out, int64_t n, cudaStream_t s) {
  add_kernel<<<grid_for(n, kThreads), kThreads, 0, s>>>(a, b, out, n);
  return cudaGetLastError();
}

cudaError_t axpy(float* dst, const float* src, float alpha, int64_t n, cudaStream_t s) {
  axpy_kernel<<<grid_for(n, kThreads), kThreads, 0, s>>>(dst, src, alpha, n);
  return cudaGetLastError();
}

cudaError_t scale(float* p, float alpha, int64_t n, cudaStream_t s) {
  scale_kernel<<<grid_for(n, kThreads), kThreads, 0, s>>>(p, alpha, n);
  return cudaGetLastError();
}

cudaError_t sum_squares(const float* p, int64_t n, double* scratch, cudaStream_t s) {
  sum_squares_kernel<<<kSumBlocks, kThreads, 0, s>>>(p, n, scratch);
  sum_partials_kernel<<<1, kThreads, 0, s>>>(scratch, kSumBlocks, scratch + kSumBlocks);
  return cudaGetLastError();
}

cudaError_t cast(const void* src, DType src_dtype, void* dst, DType dst_dtype, int64_t n, cudaStream_t s) {
  switch (src_dtype) {
    case DType::kF32: return cast_from(static_cast<const float*>(src), dst, dst_dtype, n, s);
    case DType::kBF16: return cast_from(static_cast<const __nv_bfloat16*>(src), dst, dst_dtype, n, s);
    case DType::kF16: return cast_from(static_cast<const __half*>(src), dst, dst_dtype, n, s);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace moeforge::cuda::launch
