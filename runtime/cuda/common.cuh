// Device helpers shared by the CUDA kernels: launch sizes, warp and block reductions, and fp32
// <-> bf16/f16 conversion. Reductions run in a fixed tree order, so a kernel's result depends only
// on its launch configuration, never on timing (no atomics unless a kernel says so).
//
// The .cu files hold kernels and their launchers only (runtime/cuda/launchers.h): nvcc 13 cannot
// compile fmt's C++20 format-string checks, so nothing nvcc compiles includes fmt, Tensor or the
// error macros. Launchers return the launch's cudaError_t; the Tensor-level ops in
// runtime/cuda/ops_*.cpp check it and allocate any scratch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>

#include "runtime/dtype.h"

namespace moeforge::cuda {

constexpr int kWarp = 32;

// Blocks for a grid-stride loop over n items: enough to fill the device, capped so tiny inputs
// launch tiny grids.
inline unsigned grid_for(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(blocks, int64_t{1} << 16)));
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ double warp_sum(double v) {
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int o = kWarp / 2; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
// `scratch` holds 32 values; the call ends with a barrier, so it can be reused right after.
template <class T>
__device__ __forceinline__ T block_sum(T v, T* scratch) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T r = lane < warps ? scratch[lane] : T(0);
  r = warp_sum(r);
  __syncthreads();
  return r;
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  v = warp_max(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float r = lane < warps ? scratch[lane] : -INFINITY;
  r = warp_max(r);
  __syncthreads();
  return r;
}

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }

template <class T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }

// ---- storage types (bf16 mixed precision) ----
// Kernels are templated on the storage types of their tensors (float or __nv_bfloat16): loads
// widen to f32, all arithmetic and accumulation is f32, each store rounds once to nearest even.
//
// Calls f(T{}) with T the storage type of a compute dtype (f32 or bf16) and returns its result;
// any other dtype returns cudaErrorInvalidValue (the Tensor-level ops reject those first).
template <class F>
inline cudaError_t with_storage(DType t, F&& f) {
  switch (t) {
    case DType::kF32: return f(float{});
    case DType::kBF16: return f(__nv_bfloat16{});
    default: return cudaErrorInvalidValue;
  }
}
// The same over two independent dtypes: f(A{}, B{}).
template <class F>
inline cudaError_t with_storage2(DType a, DType b, F&& f) {
  return with_storage(a, [&](auto ta) { return with_storage(b, [&](auto tb) { return f(ta, tb); }); });
}

// Elements of T in one 16-byte vector: 4 floats, 8 bf16.
template <class T>
constexpr int kVec16 = static_cast<int>(16 / sizeof(T));

// True when every non-null pointer is 16-byte aligned.
inline bool aligned16(std::initializer_list<const void*> ptrs) {
  for (const void* p : ptrs)
    if (p != nullptr && reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return true;
}
// True when the pointers are 16-byte aligned and rows of c elements of T keep it so (c a multiple
// of kVec16<T>): the condition for the row-wise 16-byte paths below.
template <class T>
inline bool vec16_ok(int64_t c, std::initializer_list<const void*> ptrs) {
  return c % kVec16<T> == 0 && aligned16(ptrs);
}

// V elements at p widened to f32. When V elements of T are a whole number of 16-byte vectors
// (V = 4 floats or 8 bf16, or a multiple), they are read with 16-byte loads and p must be 16-byte
// aligned; otherwise V scalar loads.
template <int V, class T>
__device__ __forceinline__ void load_f32(const T* p, float (&out)[V]) {
  if constexpr ((V * sizeof(T)) % 16 == 0) {
    constexpr int kPer = static_cast<int>(16 / sizeof(T));
#pragma unroll
    for (int c = 0; c < V / kPer; ++c) {
      const uint4 raw = reinterpret_cast<const uint4*>(p)[c];
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int i = 0; i < kPer; ++i) out[c * kPer + i] = to_f32(e[i]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) out[i] = to_f32(p[i]);
  }
}

// V f32 values rounded to T and stored at p, with 16-byte stores under load_f32's condition.
template <int V, class T>
__device__ __forceinline__ void store_f32(T* p, const float (&in)[V]) {
  if constexpr ((V * sizeof(T)) % 16 == 0) {
    alignas(16) T e[V];
#pragma unroll
    for (int i = 0; i < V; ++i) e[i] = from_f32<T>(in[i]);
#pragma unroll
    for (int c = 0; c < static_cast<int>(V * sizeof(T) / 16); ++c)
      reinterpret_cast<uint4*>(p)[c] = reinterpret_cast<const uint4*>(e)[c];
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) p[i] = from_f32<T>(in[i]);
  }
}

}  // namespace moeforge::cuda
