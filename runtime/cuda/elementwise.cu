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

// The elementwise kernels below run a grid-stride loop over n / V vectors of V elements (16-byte
// loads and stores when the launcher found every pointer 16-byte aligned; V = 1 otherwise), then
// the n % V tail element by element. Each output element is computed in f32 and rounded once.
#define MOE_GRID_STRIDE(i, count) \
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < (count); i += int64_t{gridDim.x} * blockDim.x)

template <int V, class T>
__global__ void add_kernel(const T* a, const T* b, T* out, int64_t n) {
  const int64_t nv = n / V;
  MOE_GRID_STRIDE(i, nv) {
    float x[V], y[V];
    load_f32<V>(a + i * V, x);
    load_f32<V>(b + i * V, y);
#pragma unroll
    for (int t = 0; t < V; ++t) x[t] += y[t];
    store_f32<V>(out + i * V, x);
  }
  MOE_GRID_STRIDE(i, n - nv * V) {
    const int64_t j = nv * V + i;
    out[j] = from_f32<T>(to_f32(a[j]) + to_f32(b[j]));
  }
}

template <int V, class D, class S>
__global__ void axpy_kernel(D* dst, const S* src, float alpha, int64_t n) {
  const int64_t nv = n / V;
  MOE_GRID_STRIDE(i, nv) {
    float d[V], x[V];
    load_f32<V>(dst + i * V, d);
    load_f32<V>(src + i * V, x);
#pragma unroll
    for (int t = 0; t < V; ++t) d[t] += alpha * x[t];
    store_f32<V>(dst + i * V, d);
  }
  MOE_GRID_STRIDE(i, n - nv * V) {
    const int64_t j = nv * V + i;
    dst[j] = from_f32<D>(to_f32(dst[j]) + alpha * to_f32(src[j]));
  }
}

template <int V, class T>
__global__ void scale_kernel(T* p, float alpha, int64_t n) {
  const int64_t nv = n / V;
  MOE_GRID_STRIDE(i, nv) {
    float x[V];
    load_f32<V>(p + i * V, x);
#pragma unroll
    for (int t = 0; t < V; ++t) x[t] *= alpha;
    store_f32<V>(p + i * V, x);
  }
  MOE_GRID_STRIDE(i, n - nv * V) {
    const int64_t j = nv * V + i;
    p[j] = from_f32<T>(to_f32(p[j]) * alpha);
  }
}

// Each block sums a fixed grid-stride slice in double; the per-block results are then added in
// block order by sum_partials_kernel: the same bits on every run.
template <class T>
__global__ void sum_squares_kernel(const T* p, int64_t n, double* partial) {
  __shared__ double scratch[32];
  double s = 0.0;
  MOE_GRID_STRIDE(i, n) {
    const double v = to_f32(p[i]);
    s += v * v;
  }
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

template <int V, class S, class D>
__global__ void cast_kernel(const S* src, D* dst, int64_t n) {
  const int64_t nv = n / V;
  MOE_GRID_STRIDE(i, nv) {
    float x[V];
    load_f32<V>(src + i * V, x);
    store_f32<V>(dst + i * V, x);
  }
  MOE_GRID_STRIDE(i, n - nv * V) dst[nv * V + i] = from_f32<D>(to_f32(src[nv * V + i]));
}

// Vector width of an elementwise launch over these pointers: 8 elements (16-byte bf16 vectors,
// two float4) when any is bf16, 4 for all-f32, 1 when a pointer is not 16-byte aligned.
template <class... T>
int elementwise_width(const T*... p) {
  if (!aligned16({static_cast<const void*>(p)...})) return 1;
  return ((sizeof(T) == 2) || ...) ? 8 : 4;
}

template <int V>
unsigned elementwise_grid(int64_t n) {
  return grid_for(std::max<int64_t>(1, n / V), kThreads);
}

template <class S, class D>
cudaError_t cast_typed(const S* src, D* dst, int64_t n, cudaStream_t s) {
  switch (elementwise_width(src, dst)) {
    case 8: cast_kernel<8><<<elementwise_grid<8>(n), kThreads, 0, s>>>(src, dst, n); break;
    case 4: cast_kernel<4><<<elementwise_grid<4>(n), kThreads, 0, s>>>(src, dst, n); break;
    default: cast_kernel<1><<<elementwise_grid<1>(n), kThreads, 0, s>>>(src, dst, n); break;
  }
  return cudaGetLastError();
}

template <class S>
cudaError_t cast_from(const S* src, void* dst, DType dst_dtype, int64_t n, cudaStream_t s) {
  switch (dst_dtype) {
    case DType::kF32: return cast_typed(src, static_cast<float*>(dst), n, s);
    case DType::kBF16: return cast_typed(src, static_cast<__nv_bfloat16*>(dst), n, s);
    case DType::kF16: return cast_typed(src, static_cast<__half*>(dst), n, s);
    default: return cudaErrorInvalidValue;
  }
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

cudaError_t add(const void* a, const void* b, void* out, DType dtype, int64_t n, cudaStream_t s) {
  return with_storage(dtype, [&](auto tag) {
    using T = decltype(tag);
    const auto* pa = static_cast<const T*>(a);
    const auto* pb = static_cast<const T*>(b);
    auto* po = static_cast<T*>(out);
    switch (elementwise_width(pa, pb, static_cast<const T*>(po))) {
      case 8: add_kernel<8><<<elementwise_grid<8>(n), kThreads, 0, s>>>(pa, pb, po, n); break;
      case 4: add_kernel<4><<<elementwise_grid<4>(n), kThreads, 0, s>>>(pa, pb, po, n); break;
      default: add_kernel<1><<<elementwise_grid<1>(n), kThreads, 0, s>>>(pa, pb, po, n); break;
    }
    return cudaGetLastError();
  });
}

cudaError_t axpy(void* dst, DType dst_dtype, const void* src, DType src_dtype, float alpha, int64_t n,
                 cudaStream_t s) {
  return with_storage2(dst_dtype, src_dtype, [&](auto td, auto ts) {
    using D = decltype(td);
    using S = decltype(ts);
    auto* pd = static_cast<D*>(dst);
    const auto* ps = static_cast<const S*>(src);
    switch (elementwise_width(static_cast<const D*>(pd), ps)) {
      case 8: axpy_kernel<8><<<elementwise_grid<8>(n), kThreads, 0, s>>>(pd, ps, alpha, n); break;
      case 4: axpy_kernel<4><<<elementwise_grid<4>(n), kThreads, 0, s>>>(pd, ps, alpha, n); break;
      default: axpy_kernel<1><<<elementwise_grid<1>(n), kThreads, 0, s>>>(pd, ps, alpha, n); break;
    }
    return cudaGetLastError();
  });
}

cudaError_t scale(void* p, DType dtype, float alpha, int64_t n, cudaStream_t s) {
  return with_storage(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto* pt = static_cast<T*>(p);
    switch (elementwise_width(static_cast<const T*>(pt))) {
      case 8: scale_kernel<8><<<elementwise_grid<8>(n), kThreads, 0, s>>>(pt, alpha, n); break;
      case 4: scale_kernel<4><<<elementwise_grid<4>(n), kThreads, 0, s>>>(pt, alpha, n); break;
      default: scale_kernel<1><<<elementwise_grid<1>(n), kThreads, 0, s>>>(pt, alpha, n); break;
    }
    return cudaGetLastError();
  });
}

cudaError_t sum_squares(const void* p, DType dtype, int64_t n, double* scratch, cudaStream_t s) {
  return with_storage(dtype, [&](auto tag) {
    using T = decltype(tag);
    sum_squares_kernel<<<kSumBlocks, kThreads, 0, s>>>(static_cast<const T*>(p), n, scratch);
    sum_partials_kernel<<<1, kThreads, 0, s>>>(scratch, kSumBlocks, scratch + kSumBlocks);
    return cudaGetLastError();
  });
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
