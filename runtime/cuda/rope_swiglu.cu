// CUDA rotary position embedding and SwiGLU: elementwise, memory bound.
//
// RoPE builds the (T, D/2) cos/sin table once per call with double angles, as the CPU kernel
// does (t * inv_freq reaches 1e4..1e5 radians for long sequences, where an f32 angle is off by
// ~1e-3), then rotates every (b, t, h) row's pairs from the table. Each pair is read before it is
// written by the same thread, so out may alias x.
#include "runtime/cuda/common.cuh"
#include "runtime/cuda/launchers.h"

namespace moeforge::cuda::launch {
namespace {

constexpr int kThreads = 256;

__global__ void rope_table_kernel(float theta, int64_t t, int64_t half, int64_t d, float sign, float* cos_t,
                                  float* sin_t) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < t * half; i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t pos = i / half, j = i % half;
    const double inv_freq = pow(static_cast<double>(theta), -2.0 * static_cast<double>(j) / static_cast<double>(d));
    double s = 0, c = 0;
    sincos(static_cast<double>(pos) * inv_freq, &s, &c);
    cos_t[i] = static_cast<float>(c);
    sin_t[i] = sign * static_cast<float>(s);
  }
}

// x, out (B*T*H, D); one thread per pair.
template <class T>
__global__ void rope_apply_kernel(const T* x, T* out, const float* cos_t, const float* sin_t, int64_t rows,
                                  int64_t t, int64_t h, int64_t half) {
  const int64_t total = rows * half;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total; i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t row = i / half, j = i % half;
    const int64_t pos = (row / h) % t;
    const float c = cos_t[pos * half + j], s = sin_t[pos * half + j];
    const T* xi = x + row * 2 * half;
    T* oi = out + row * 2 * half;
    const float x1 = to_f32(xi[j]), x2 = to_f32(xi[j + half]);
    oi[j] = from_f32<T>(x1 * c - x2 * s);
    oi[j + half] = from_f32<T>(x2 * c + x1 * s);
  }
}

// sigmoid(g) = 1 / (1 + exp(-g)): exactly 0 (not NaN) when exp overflows, as on the CPU.
__device__ __forceinline__ float sigmoid(float g) { return 1.0f / (1.0f + expf(-g)); }

// The SwiGLU kernels: n / V vectors of V elements (16-byte accesses when the launcher found the
// pointers aligned, V = 1 otherwise), then the n % V tail; f32 math, one rounding per store.
template <int V, class T>
__global__ void swiglu_fwd_kernel(const T* gate, const T* up, T* out, int64_t n) {
  const int64_t nv = n / V, stride = int64_t{gridDim.x} * blockDim.x;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < nv; i += stride) {
    float g[V], u[V];
    load_f32<V>(gate + i * V, g);
    load_f32<V>(up + i * V, u);
#pragma unroll
    for (int t = 0; t < V; ++t) g[t] = g[t] * sigmoid(g[t]) * u[t];
    store_f32<V>(out + i * V, g);
  }
  for (int64_t i = nv * V + blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += stride) {
    const float g = to_f32(gate[i]);
    out[i] = from_f32<T>(g * sigmoid(g) * to_f32(up[i]));
  }
}

// d silu / dg = s (1 + g (1 - s)) with s = sigmoid(g).
template <int V, class T>
__global__ void swiglu_bwd_kernel(const T* gate, const T* up, const T* dout, T* dgate, T* dup, int64_t n) {
  const int64_t nv = n / V, stride = int64_t{gridDim.x} * blockDim.x;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < nv; i += stride) {
    float g[V], u[V], d[V], dg[V], du[V];
    load_f32<V>(gate + i * V, g);
    load_f32<V>(up + i * V, u);
    load_f32<V>(dout + i * V, d);
#pragma unroll
    for (int t = 0; t < V; ++t) {
      const float sg = sigmoid(g[t]);
      dg[t] = d[t] * u[t] * sg * (1.0f + g[t] * (1.0f - sg));
      du[t] = d[t] * g[t] * sg;
    }
    store_f32<V>(dgate + i * V, dg);
    store_f32<V>(dup + i * V, du);
  }
  for (int64_t i = nv * V + blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += stride) {
    const float g = to_f32(gate[i]), u = to_f32(up[i]), d = to_f32(dout[i]);
    const float sg = sigmoid(g);
    dgate[i] = from_f32<T>(d * u * sg * (1.0f + g * (1.0f - sg)));
    dup[i] = from_f32<T>(d * g * sg);
  }
}

// 16-byte vectors: 4 floats or 8 bf16.
template <class T>
constexpr int kV = kVec16<T>;

}  // namespace

cudaError_t rope(const void* x, void* out, DType dtype, int64_t b, int64_t t, int64_t h, int64_t d, float theta,
                 float sign, float* table, cudaStream_t s) {
  const int64_t half = d / 2, rows = b * t * h;
  float* cos_t = table;
  float* sin_t = table + t * half;
  rope_table_kernel<<<grid_for(t * half, kThreads), kThreads, 0, s>>>(theta, t, half, d, sign, cos_t, sin_t);
  return with_storage(dtype, [&](auto tag) {
    using T = decltype(tag);
    rope_apply_kernel<<<grid_for(rows * half, kThreads), kThreads, 0, s>>>(
        static_cast<const T*>(x), static_cast<T*>(out), cos_t, sin_t, rows, t, h, half);
    return cudaGetLastError();
  });
}

cudaError_t swiglu_fwd(const void* gate, const void* up, void* out, DType dtype, int64_t n, cudaStream_t s) {
  return with_storage(dtype, [&](auto tag) {
    using T = decltype(tag);
    const auto* g = static_cast<const T*>(gate);
    const auto* u = static_cast<const T*>(up);
    auto* o = static_cast<T*>(out);
    if (aligned16({g, u, o}))
      swiglu_fwd_kernel<kV<T>><<<grid_for(std::max<int64_t>(1, n / kV<T>), kThreads), kThreads, 0, s>>>(g, u, o, n);
    else
      swiglu_fwd_kernel<1><<<grid_for(n, kThreads), kThreads, 0, s>>>(g, u, o, n);
    return cudaGetLastError();
  });
}

cudaError_t swiglu_bwd(const void* gate, const void* up, const void* dout, void* dgate, void* dup, DType dtype,
                       int64_t n, cudaStream_t s) {
  return with_storage(dtype, [&](auto tag) {
    using T = decltype(tag);
    const auto* g = static_cast<const T*>(gate);
    const auto* u = static_cast<const T*>(up);
    const auto* d = static_cast<const T*>(dout);
    auto* dg = static_cast<T*>(dgate);
    auto* du = static_cast<T*>(dup);
    if (aligned16({g, u, d, dg, du}))
      swiglu_bwd_kernel<kV<T>><<<grid_for(std::max<int64_t>(1, n / kV<T>), kThreads), kThreads, 0, s>>>(g, u, d, dg,
                                                                                                    du, n);
    else
      swiglu_bwd_kernel<1><<<grid_for(n, kThreads), kThreads, 0, s>>>(g, u, d, dg, du, n);
    return cudaGetLastError();
  });
}

}  // namespace moeforge::cuda::launch
