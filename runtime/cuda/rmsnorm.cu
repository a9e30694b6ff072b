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

// Storage types: X of x, out, dout and dx; W of w; D of dw (each float or __nv_bfloat16).
// Everything is computed in f32 from the widened loads; rstd and the dw partials stay f32.
// The row kernels walk a row in vectors of V elements: V = 8 (16-byte bf16 accesses) for bf16 x
// with c % 8 == 0 and aligned pointers, V = 1 otherwise. With V = 1 the loops are exactly the
// element loops of the fp32 kernels (the f32 path is unchanged).
template <int V, class X, class W>
__global__ void rmsnorm_fwd_kernel(const X* x, const W* w, float eps, X* out, float* rstd, int64_t c) {
  __shared__ float scratch[32];
  const X* xi = x + blockIdx.x * c;
  X* oi = out + blockIdx.x * c;
  float ss = 0.0f;
  for (int64_t j = threadIdx.x * int64_t{V}; j < c; j += int64_t{blockDim.x} * V) {
    float v[V];
    load_f32<V>(xi + j, v);
#pragma unroll
    for (int t = 0; t < V; ++t) ss += v[t] * v[t];
  }
  ss = block_sum(ss, scratch);
  const float r = rsqrtf(ss / static_cast<float>(c) + eps);
  if (threadIdx.x == 0) rstd[blockIdx.x] = r;
  for (int64_t j = threadIdx.x * int64_t{V}; j < c; j += int64_t{blockDim.x} * V) {
    float v[V], g[V];
    load_f32<V>(xi + j, v);
    load_f32<V>(w + j, g);
#pragma unroll
    for (int t = 0; t < V; ++t) v[t] = v[t] * r * g[t];
    store_f32<V>(oi + j, v);
  }
}

template <int V, class X, class W>
__global__ void rmsnorm_dx_kernel(const X* x, const W* w, const float* rstd, const X* dout, X* dx, int64_t c) {
  __shared__ float scratch[32];
  const X* xi = x + blockIdx.x * c;
  const X* di = dout + blockIdx.x * c;
  X* dxi = dx + blockIdx.x * c;
  const float r = rstd[blockIdx.x];
  float gx = 0.0f;
  for (int64_t j = threadIdx.x * int64_t{V}; j < c; j += int64_t{blockDim.x} * V) {
    float xv[V], wv[V], dv[V];
    load_f32<V>(xi + j, xv);
    load_f32<V>(w + j, wv);
    load_f32<V>(di + j, dv);
#pragma unroll
    for (int t = 0; t < V; ++t) gx += wv[t] * dv[t] * xv[t];
  }
  gx = block_sum(gx, scratch);
  const float coef = r * r * r * gx / static_cast<float>(c);
  for (int64_t j = threadIdx.x * int64_t{V}; j < c; j += int64_t{blockDim.x} * V) {
    float xv[V], wv[V], dv[V];
    load_f32<V>(xi + j, xv);
    load_f32<V>(w + j, wv);
    load_f32<V>(di + j, dv);
#pragma unroll
    for (int t = 0; t < V; ++t) xv[t] = r * wv[t] * dv[t] - xv[t] * coef;
    store_f32<V>(dxi + j, xv);
  }
}

// 8 for bf16 rows that allow 16-byte vectors (see above), else 1.
template <class X>
int row_vec(int64_t c, std::initializer_list<const void*> ptrs) {
  return sizeof(X) == 2 && vec16_ok<X>(c, ptrs) ? 8 : 1;
}

// partial[chunk, j] = sum over the chunk's rows of dout * x * rstd.
template <class X>
__global__ void rmsnorm_dw_partial_kernel(const X* x, const float* rstd, const X* dout, float* partial, int64_t n,
                                          int64_t c) {
  const int64_t j = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (j >= c) return;
  const int64_t begin = blockIdx.y * kChunkRows, end = min(n, begin + kChunkRows);
  float s = 0.0f;
  for (int64_t i = begin; i < end; ++i) s += to_f32(dout[i * c + j]) * to_f32(x[i * c + j]) * rstd[i];
  partial[blockIdx.y * c + j] = s;
}

// dw += the chunks' sum, in chunk order, rounded once into D.
template <class D>
__global__ void rmsnorm_dw_sum_kernel(const float* partial, int64_t chunks, D* dw, int64_t c) {
  const int64_t j = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (j >= c) return;
  float s = 0.0f;
  for (int64_t b = 0; b < chunks; ++b) s += partial[b * c + j];
  dw[j] = from_f32<D>(to_f32(dw[j]) + s);
}

}  // namespace

cudaError_t rmsnorm_fwd(const void* x, const void* w, float eps, void* out, float* rstd, int64_t n, int64_t c,
                        const RmsNormDTypes& t, cudaStream_t s) {
  return with_storage2(t.x, t.w, [&](auto tx, auto tw) {
    using X = decltype(tx);
    using W = decltype(tw);
    const auto* px = static_cast<const X*>(x);
    const auto* pw = static_cast<const W*>(w);
    auto* po = static_cast<X*>(out);
    if (row_vec<X>(c, {px, pw, po}) == 8)
      rmsnorm_fwd_kernel<8><<<static_cast<unsigned>(n), row_threads(c / 8), 0, s>>>(px, pw, eps, po, rstd, c);
    else
      rmsnorm_fwd_kernel<1><<<static_cast<unsigned>(n), row_threads(c), 0, s>>>(px, pw, eps, po, rstd, c);
    return cudaGetLastError();
  });
}

int64_t rmsnorm_bwd_chunks(int64_t n) { return (n + kChunkRows - 1) / kChunkRows; }

cudaError_t rmsnorm_bwd(const void* x, const void* w, const float* rstd, const void* dout, void* dx, void* dw,
                        int64_t n, int64_t c, float* partial, const RmsNormDTypes& t, cudaStream_t s) {
  const unsigned col_blocks = static_cast<unsigned>((c + kThreads - 1) / kThreads);
  cudaError_t st = with_storage2(t.x, t.w, [&](auto tx, auto tw) {
    using X = decltype(tx);
    using W = decltype(tw);
    const auto* px = static_cast<const X*>(x);
    const auto* pw = static_cast<const W*>(w);
    const auto* pd = static_cast<const X*>(dout);
    auto* pdx = static_cast<X*>(dx);
    if (row_vec<X>(c, {px, pw, pd, pdx}) == 8)
      rmsnorm_dx_kernel<8><<<static_cast<unsigned>(n), row_threads(c / 8), 0, s>>>(px, pw, rstd, pd, pdx, c);
    else
      rmsnorm_dx_kernel<1><<<static_cast<unsigned>(n), row_threads(c), 0, s>>>(px, pw, rstd, pd, pdx, c);
    rmsnorm_dw_partial_kernel<<<dim3(col_blocks, static_cast<unsigned>(rmsnorm_bwd_chunks(n))), kThreads, 0, s>>>(
        static_cast<const X*>(x), rstd, static_cast<const X*>(dout), partial, n, c);
    return cudaGetLastError();
  });
  if (st != cudaSuccess) return st;
  return with_storage(t.dw, [&](auto td) {
    using D = decltype(td);
    rmsnorm_dw_sum_kernel<<<col_blocks, kThreads, 0, s>>>(partial, rmsnorm_bwd_chunks(n), static_cast<D*>(dw), c);
    return cudaGetLastError();
  });
}

}  // namespace moeforge::cuda::launch
