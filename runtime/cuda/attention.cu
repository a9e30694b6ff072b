// CUDA causal grouped-query attention: a plain, correct implementation so that every op of the
// catalog has a CUDA kernel. The fast fused kernels (tensor cores, tiles in shared memory) are
// issue 10's; these are their reference on the device.
//
// One warp per (b, h, query row) for the forward and dq, one warp per (b, kv head, key row) for
// dk and dv. A row's D values are spread over the lanes (lane l holds d = l + 32 r); dot products
// are warp reductions. The forward is the online softmax of FlashAttention (running max m and sum
// l, output rescaled as m grows), saving lse = m + log(l). The backward rebuilds each probability
// as exp(scale q·k - lse) and uses delta_i = <dout_i, out_i> (FlashAttention-2, Algorithm 2):
//   dv_j = sum_i p_ij dout_i,   ds_ij = p_ij (dout_i·v_j - delta_i),
//   dq_i = scale sum_j ds_ij k_j,   dk_j = scale sum_i ds_ij q_i.
// Every sum runs in index order in one warp: deterministic, no atomics. Memory is linear in T.
#include <type_traits>

#include "runtime/cuda/common.cuh"
#include "runtime/cuda/launchers.h"

namespace moeforge::cuda::launch {
namespace {

constexpr int kWarpsPerBlock = 4;

using Dims = AttentionDims;

// Element r of this lane's share of a D-vector at p.
template <int kPer>
__device__ __forceinline__ void load_row(const float* p, int64_t d, float (&x)[kPer]) {
  const int lane = threadIdx.x % kWarp;
#pragma unroll
  for (int r = 0; r < kPer; ++r) {
    const int64_t i = lane + r * kWarp;
    x[r] = i < d ? p[i] : 0.0f;
  }
}

template <int kPer>
__device__ __forceinline__ void store_row(float* p, int64_t d, const float (&x)[kPer]) {
  const int lane = threadIdx.x % kWarp;
#pragma unroll
  for (int r = 0; r < kPer; ++r) {
    const int64_t i = lane + r * kWarp;
    if (i < d) p[i] = x[r];
  }
}

template <int kPer>
__device__ __forceinline__ float dot_row(const float (&x)[kPer], const float* p, int64_t d) {
  const int lane = threadIdx.x % kWarp;
  float s = 0.0f;
#pragma unroll
  for (int r = 0; r < kPer; ++r) {
    const int64_t i = lane + r * kWarp;
    if (i < d) s += x[r] * p[i];
  }
  return warp_sum(s);
}

// Row pointers in the (B, T, H, D) and (B, T, Hkv, D) layouts.
__device__ __forceinline__ int64_t q_row(const Dims& d, int64_t b, int64_t t, int64_t h) {
  return ((b * d.T + t) * d.H + h) * d.D;
}
__device__ __forceinline__ int64_t kv_row(const Dims& d, int64_t b, int64_t t, int64_t g) {
  return ((b * d.T + t) * d.Hkv + g) * d.D;
}

// Warp w of the grid handles row w of (B, H, T) (query rows) or (B, Hkv, T) (key rows).
__device__ __forceinline__ int64_t global_warp() {
  return (blockIdx.x * int64_t{blockDim.x} + threadIdx.x) / kWarp;
}

template <int kPer>
__global__ void attention_fwd_kernel(Dims d, const float* q, const float* k, const float* v, float scale, float* out,
                                     float* lse) {
  const int64_t w = global_warp();
  if (w >= d.B * d.H * d.T) return;
  const int64_t i = w % d.T, h = (w / d.T) % d.H, b = w / (d.T * d.H);
  const int64_t g = h / (d.H / d.Hkv);
  float qi[kPer], o[kPer];
  load_row(q + q_row(d, b, i, h), d.D, qi);
#pragma unroll
  for (int r = 0; r < kPer; ++r) o[r] = 0.0f;
  float m = -INFINITY, l = 0.0f;
  for (int64_t j = 0; j <= i; ++j) {
    const float s = scale * dot_row(qi, k + kv_row(d, b, j, g), d.D);
    const float m_new = fmaxf(m, s);
    const float alpha = expf(m - m_new), p = expf(s - m_new);
    float vj[kPer];
    load_row(v + kv_row(d, b, j, g), d.D, vj);
#pragma unroll
    for (int r = 0; r < kPer; ++r) o[r] = o[r] * alpha + p * vj[r];
    l = l * alpha + p;
    m = m_new;
  }
  const float inv = 1.0f / l;
#pragma unroll
  for (int r = 0; r < kPer; ++r) o[r] *= inv;
  store_row(out + q_row(d, b, i, h), d.D, o);
  if (threadIdx.x % kWarp == 0) lse[(b * d.H + h) * d.T + i] = m + logf(l);
}

// delta (B, H, T) = <dout_i, out_i>.
template <int kPer>
__global__ void attention_delta_kernel(Dims d, const float* out, const float* dout, float* delta) {
  const int64_t w = global_warp();
  if (w >= d.B * d.H * d.T) return;
  const int64_t i = w % d.T, h = (w / d.T) % d.H, b = w / (d.T * d.H);
  float o[kPer];
  load_row(out + q_row(d, b, i, h), d.D, o);
  const float s = dot_row(o, dout + q_row(d, b, i, h), d.D);
  if (threadIdx.x % kWarp == 0) delta[(b * d.H + h) * d.T + i] = s;
}

template <int kPer>
__global__ void attention_dq_kernel(Dims d, const float* q, const float* k, const float* v, const float* lse,
                                    const float* delta, const float* dout, float scale, float* dq) {
  const int64_t w = global_warp();
  if (w >= d.B * d.H * d.T) return;
  const int64_t i = w % d.T, h = (w / d.T) % d.H, b = w / (d.T * d.H);
  const int64_t g = h / (d.H / d.Hkv);
  float qi[kPer], doi[kPer], acc[kPer];
  load_row(q + q_row(d, b, i, h), d.D, qi);
  load_row(dout + q_row(d, b, i, h), d.D, doi);
#pragma unroll
  for (int r = 0; r < kPer; ++r) acc[r] = 0.0f;
  const float row_lse = lse[(b * d.H + h) * d.T + i], row_delta = delta[(b * d.H + h) * d.T + i];
  for (int64_t j = 0; j <= i; ++j) {
    const float* kj = k + kv_row(d, b, j, g);
    const float p = expf(scale * dot_row(qi, kj, d.D) - row_lse);
    const float ds = p * (dot_row(doi, v + kv_row(d, b, j, g), d.D) - row_delta);
    float kr[kPer];
    load_row(kj, d.D, kr);
#pragma unroll
    for (int r = 0; r < kPer; ++r) acc[r] += ds * kr[r];
  }
#pragma unroll
  for (int r = 0; r < kPer; ++r) acc[r] *= scale;
  store_row(dq + q_row(d, b, i, h), d.D, acc);
}

template <int kPer>
__global__ void attention_dkv_kernel(Dims d, const float* q, const float* k, const float* v, const float* lse,
                                     const float* delta, const float* dout, float scale, float* dk, float* dv) {
  const int64_t w = global_warp();
  if (w >= d.B * d.Hkv * d.T) return;
  const int64_t j = w % d.T, g = (w / d.T) % d.Hkv, b = w / (d.T * d.Hkv);
  const int64_t group = d.H / d.Hkv;
  float kj[kPer], vj[kPer], dk_acc[kPer], dv_acc[kPer];
  load_row(k + kv_row(d, b, j, g), d.D, kj);
  load_row(v + kv_row(d, b, j, g), d.D, vj);
#pragma unroll
  for (int r = 0; r < kPer; ++r) dk_acc[r] = dv_acc[r] = 0.0f;
  for (int64_t h = g * group; h < (g + 1) * group; ++h) {
    for (int64_t i = j; i < d.T; ++i) {
      const float* qi = q + q_row(d, b, i, h);
      const float* doi = dout + q_row(d, b, i, h);
      const int64_t row = (b * d.H + h) * d.T + i;
      const float p = expf(scale * dot_row(kj, qi, d.D) - lse[row]);
      const float ds = p * (dot_row(vj, doi, d.D) - delta[row]);
      float qr[kPer], dor[kPer];
      load_row(qi, d.D, qr);
      load_row(doi, d.D, dor);
#pragma unroll
      for (int r = 0; r < kPer; ++r) {
        dv_acc[r] += p * dor[r];
        dk_acc[r] += ds * qr[r];
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kPer; ++r) dk_acc[r] *= scale;
  store_row(dk + kv_row(d, b, j, g), d.D, dk_acc);
  store_row(dv + kv_row(d, b, j, g), d.D, dv_acc);
}

unsigned blocks_for_rows(int64_t rows) { return static_cast<unsigned>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock); }

// Calls fn(std::integral_constant<int, kPer>) with the smallest lane share covering D.
template <class Fn>
void with_lane_share(int64_t d, Fn&& fn) {
  if (d <= kWarp) return fn(std::integral_constant<int, 1>{});
  if (d <= 2 * kWarp) return fn(std::integral_constant<int, 2>{});
  if (d <= 4 * kWarp) return fn(std::integral_constant<int, 4>{});
  return fn(std::integral_constant<int, 8>{});
}
static_assert(kAttentionMaxHeadDim == 8 * kWarp);

constexpr unsigned kThreads = kWarpsPerBlock * kWarp;

}  // namespace

cudaError_t attention_fwd(const AttentionDims& d, const float* q, const float* k, const float* v, float scale,
                          float* out, float* lse, cudaStream_t s) {
  with_lane_share(d.D, [&](auto per) {
    attention_fwd_kernel<decltype(per)::value><<<blocks_for_rows(d.B * d.H * d.T), kThreads, 0, s>>>(d, q, k, v, scale,
                                                                                                    out, lse);
  });
  return cudaGetLastError();
}

cudaError_t attention_bwd(const AttentionDims& d, const float* q, const float* k, const float* v, const float* out,
                          const float* lse, const float* dout, float scale, float* dq, float* dk, float* dv,
                          float* delta, cudaStream_t s) {
  const unsigned q_blocks = blocks_for_rows(d.B * d.H * d.T), kv_blocks = blocks_for_rows(d.B * d.Hkv * d.T);
  with_lane_share(d.D, [&](auto per) {
    constexpr int kPer = decltype(per)::value;
    attention_delta_kernel<kPer><<<q_blocks, kThreads, 0, s>>>(d, out, dout, delta);
    attention_dq_kernel<kPer><<<q_blocks, kThreads, 0, s>>>(d, q, k, v, lse, delta, dout, scale, dq);
    attention_dkv_kernel<kPer><<<kv_blocks, kThreads, 0, s>>>(d, q, k, v, lse, delta, dout, scale, dk, dv);
  });
  return cudaGetLastError();
}

}  // namespace moeforge::cuda::launch
