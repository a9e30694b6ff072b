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
__global__ void rope_apply_kernel(const float* x, float* out, const float* cos_t, const float* sin_t, int64_t rows,
                                  int64_t t, int64_t h, int64_t half) {
  const int64_t total = rows * half;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total; i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t row = i / half, j = i % half;
    const int64_t pos = (row / h) % t;
    const float c = cos_t[pos * half + j], s = sin_t[pos * half + j];
    const float* xi = x + row * 2 * half;
    float* oi = out + row * 2 * half;
    const float x1 = xi[j], x2 = xi[j + half];
    oi[j] = x1 * c - x2 * s;
    oi[j + half] = x2 * c + x1 * s;
  }
}

// sigmoid(g) = 1 / (1 + exp(-g)): exactly 0 (not NaN) when exp overflows, as on the CPU.
__device__ __forceinline__ float sigmoid(float g) { return 1.0f / (1.0f + expf(-g)); }

__global__ void swiglu_fwd_kernel(const float* gate, const float* up, float* out, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    const float g = gate[i];
    out[i] = g * sigmoid(g) * up[i];
  }
}

// d silu / dg = s (1 + g (1 - s)) with s = sigmoid(g).
__global__ void swiglu_bwd_kernel(const float* gate, const float* up, const float* dout, float* dgate, float* dup,
                                  int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    const float g = gate[i], u = up[i], d = dout[i];
    const float s = sigmoid(g);
    dgate[i] = d * u * s * (1.0f + g * (1.0f - s));
    dup[i] = d * g * s;
  }
}

}  // namespace

cudaError_t rope(const float* x, float* out, int64_t b, int64_t t, int64_t h, int64_t d, float theta, float sign,
                 float* table, cudaStream_t s) {
  const int64_t half = d / 2, rows = b * t * h;
  float* cos_t = table;
  float* sin_t = table + t * half;
  rope_table_kernel<<<grid_for(t * half, kThreads), kThreads, 0, s>>>(theta, t, half, d, sign, cos_t, sin_t);
  rope_apply_kernel<<<grid_for(rows * half, kThreads), kThreads, 0, s>>>(x, out, cos_t, sin_t, rows, t, h, half);
  return cudaGetLastError();
}

cudaError_t swiglu_fwd(const float* gate, const float* up, float* out, int64_t n, cudaStream_t s) {
  swiglu_fwd_kernel<<<grid_for(n, kThreads), kThreads, 0, s>>>(gate, up, out, n);
  return cudaGetLastError();
}

cudaError_t swiglu_bwd(const float* gate, const float* up, const float* dout, float* dgate, float* dup, int64_t n,
                       cudaStream_t s) {
  swiglu_bwd_kernel<<<grid_for(n, kThreads), kThreads, 0, s>>>(gate, up, dout, dgate, dup, n);
  return cudaGetLastError();
}

}  // namespace moeforge::cuda::launch
