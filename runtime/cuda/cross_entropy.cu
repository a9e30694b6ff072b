// CUDA softmax cross-entropy over the vocabulary, fused and vocab-parallel (contracts in
// runtime/ops.h, formulas in runtime/cpu/cross_entropy.cpp).
//
// One block per row. The row's statistics come from one read of the logits with an online
// softmax per thread (running max m and sum s of exp(x - m), rescaled when m grows), combined over
// the block in a fixed tree order; no (N, V) intermediate is written. The backward rebuilds the
// probabilities from the saved lse. A target >= the vocabulary cannot raise an Error here: its
// row's loss becomes NaN (see runtime/cuda/kernels.h).
#include "runtime/cuda/common.cuh"
#include "runtime/cuda/launchers.h"

namespace moeforge::cuda::launch {
namespace {

constexpr int kThreads = 256;

struct Stats {
  float max;
  float sum;
};

__device__ __forceinline__ Stats merge(Stats a, Stats b) {
  const float m = fmaxf(a.max, b.max);
  if (m == -INFINITY) return {m, 0.0f};
  return {m, a.sum * expf(a.max - m) + b.sum * expf(b.max - m)};
}

// The block's (max, sum exp(x - max)) over x[0, v); (-inf, 0) when v = 0. L is the logits'
// storage type (float or __nv_bfloat16): bf16 logits are widened on load, the statistics are f32.
// The row is read in vectors of V elements: V = 8 (16-byte bf16 loads; v % 8 == 0 and aligned
// rows, which the launcher checks) or V = 1, the fp32 kernel's element loop exactly.
template <int V, class L>
__device__ Stats row_stats(const L* x, int64_t v) {
  __shared__ float smax[32], ssum[32];
  Stats st{-INFINITY, 0.0f};
  for (int64_t j0 = threadIdx.x * int64_t{V}; j0 < v; j0 += int64_t{blockDim.x} * V) {
    float xv[V];
    load_f32<V>(x + j0, xv);
#pragma unroll
    for (int t = 0; t < V; ++t) {
      const float xj = xv[t];
      if (xj > st.max) {
        st.sum = st.sum * expf(st.max - xj) + 1.0f;
        st.max = xj;
      } else {
        st.sum += expf(xj - st.max);
      }
    }
  }
  for (int o = kWarp / 2; o > 0; o /= 2) {
    const Stats other{__shfl_xor_sync(0xffffffffu, st.max, o), __shfl_xor_sync(0xffffffffu, st.sum, o)};
    st = merge(st, other);
  }
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  if (lane == 0) {
    smax[warp] = st.max;
    ssum[warp] = st.sum;
  }
  __syncthreads();
  Stats r{-INFINITY, 0.0f};
  for (int w = 0; w < warps; ++w) r = merge(r, Stats{smax[w], ssum[w]});
  __syncthreads();
  return r;
}

template <int V, class L>
__global__ void ce_fwd_kernel(const L* logits, const int32_t* targets, float* losses, float* lse, int64_t v) {
  const int64_t i = blockIdx.x;
  const L* xi = logits + i * v;
  const Stats st = row_stats<V>(xi, v);
  if (threadIdx.x != 0) return;
  const float row_lse = st.max + logf(st.sum);
  const int32_t t = targets[i];
  lse[i] = row_lse;
  losses[i] = t < 0 ? 0.0f : t >= v ? NAN : row_lse - to_f32(xi[t]);
}

template <class L>
__global__ void ce_partial_kernel(const L* logits, const int32_t* targets, int64_t v, int64_t vocab_start,
                                  int64_t valid_cols, float* partial) {
  const int64_t i = blockIdx.x;
  const L* xi = logits + i * v;
  const Stats st = row_stats<1>(xi, valid_cols);
  if (threadIdx.x != 0) return;
  const int64_t col = static_cast<int64_t>(targets[i]) - vocab_start;
  float* out = partial + i * 3;
  out[0] = st.max;
  out[1] = st.sum;
  out[2] = targets[i] >= 0 && col >= 0 && col < valid_cols ? to_f32(xi[col]) : 0.0f;
}

__global__ void ce_combine_kernel(const float* partials, const int32_t* targets, int64_t r_count, int64_t n,
                                  int64_t vocab_size, float* losses, float* lse) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    float m = -INFINITY;
    for (int64_t r = 0; r < r_count; ++r) m = fmaxf(m, partials[(r * n + i) * 3]);
    double sum = 0.0, target_logit = 0.0;
    for (int64_t r = 0; r < r_count; ++r) {
      const float* st = partials + (r * n + i) * 3;
      sum += static_cast<double>(st[1]) * exp(static_cast<double>(st[0]) - m);
      target_logit += st[2];
    }
    const double row_lse = static_cast<double>(m) + log(sum);
    const int32_t t = targets[i];
    lse[i] = static_cast<float>(row_lse);
    losses[i] = t < 0 ? 0.0f : t >= vocab_size ? NAN : static_cast<float>(row_lse - target_logit);
  }
}

// dlogits may alias logits: each element is read, then written, by the same thread. L is the
// storage type of both (bf16 logits give bf16 dlogits, rounded once from the f32 gradient).
template <int V, class L>
__global__ void ce_bwd_kernel(const L* logits, const int32_t* targets, const float* lse, float scale, L* dlogits,
                              int64_t v, int64_t vocab_start, int64_t valid_cols, bool check_vocab) {
  const int64_t i = blockIdx.x;
  const L* xi = logits + i * v;
  L* di = dlogits + i * v;
  const int32_t t = targets[i];
  const float row_lse = check_vocab && t >= v ? NAN : lse[i];
  const int64_t col = static_cast<int64_t>(t) - vocab_start;
  const bool t_ok = t >= 0;
  for (int64_t j0 = threadIdx.x * int64_t{V}; j0 < v; j0 += int64_t{blockDim.x} * V) {
    float xv[V];
    load_f32<V>(xi + j0, xv);
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const int64_t j = j0 + e;
      float g = 0.0f;
      if (t_ok && j < valid_cols) g = scale * (expf(xv[e] - row_lse) - (j == col ? 1.0f : 0.0f));
      xv[e] = g;
    }
    store_f32<V>(di + j0, xv);
  }
}

// 8 for bf16 logits whose rows allow 16-byte vectors, else 1 (f32 keeps its element loop).
template <class L>
int row_vec(int64_t v, const void* logits, const void* dlogits) {
  return sizeof(L) == 2 && vec16_ok<L>(v, {logits, dlogits}) ? 8 : 1;
}

}  // namespace

cudaError_t cross_entropy_fwd(const void* logits, DType logits_dtype, const int32_t* targets, float* losses,
                              float* lse, int64_t n, int64_t v, cudaStream_t s) {
  return with_storage(logits_dtype, [&](auto tag) {
    using L = decltype(tag);
    const auto* pl = static_cast<const L*>(logits);
    if (row_vec<L>(v, pl, nullptr) == 8)
      ce_fwd_kernel<8><<<static_cast<unsigned>(n), kThreads, 0, s>>>(pl, targets, losses, lse, v);
    else
      ce_fwd_kernel<1><<<static_cast<unsigned>(n), kThreads, 0, s>>>(pl, targets, losses, lse, v);
    return cudaGetLastError();
  });
}

cudaError_t cross_entropy_partial_fwd(const void* logits, DType logits_dtype, const int32_t* targets, int64_t n,
                                      int64_t v, int64_t vocab_start, int64_t valid_cols, float* partial,
                                      cudaStream_t s) {
  return with_storage(logits_dtype, [&](auto tag) {
    using L = decltype(tag);
    ce_partial_kernel<<<static_cast<unsigned>(n), kThreads, 0, s>>>(static_cast<const L*>(logits), targets, v,
                                                                    vocab_start, valid_cols, partial);
    return cudaGetLastError();
  });
}

cudaError_t cross_entropy_combine(const float* partials, const int32_t* targets, int64_t r_count, int64_t n,
                                  int64_t vocab_size, float* losses, float* lse, cudaStream_t s) {
  ce_combine_kernel<<<grid_for(n, kThreads), kThreads, 0, s>>>(partials, targets, r_count, n, vocab_size, losses,
                                                               lse);
  return cudaGetLastError();
}

cudaError_t cross_entropy_bwd(const void* logits, DType logits_dtype, const int32_t* targets, const float* lse,
                              float scale, void* dlogits, int64_t n, int64_t v, int64_t vocab_start,
                              int64_t valid_cols, cudaStream_t s) {
  const bool whole = valid_cols < 0;
  return with_storage(logits_dtype, [&](auto tag) {
    using L = decltype(tag);
    const auto* pl = static_cast<const L*>(logits);
    auto* pd = static_cast<L*>(dlogits);
    const int64_t cols = whole ? v : valid_cols;
    if (row_vec<L>(v, pl, pd) == 8)
      ce_bwd_kernel<8><<<static_cast<unsigned>(n), kThreads, 0, s>>>(pl, targets, lse, scale, pd, v, vocab_start, cols,
                                                                     whole);
    else
      ce_bwd_kernel<1><<<static_cast<unsigned>(n), kThreads, 0, s>>>(pl, targets, lse, scale, pd, v, vocab_start, cols,
                                                                     whole);
    return cudaGetLastError();
  });
}

}  // namespace moeforge::cuda::launch
