// CUDA dispatch plan, capacity dropping, and the permute / unpermute row gathers (contracts in
// runtime/ops.h).
//
// Both the plan and the capacity rule need stable ranks: for each element of a sequence of expert
// ids, how many earlier elements have the same expert. They are computed without float or order-
// dependent atomics, in three steps over chunks of kChunk elements:
//   1. per chunk, a histogram of its experts (shared-memory integer counters: order-free);
//   2. per expert, an exclusive scan of the chunk histograms, in chunk order, starting from a
//      per-expert base (the plan's offsets, or the capacity rule's base counts);
//   3. per chunk, one thread walks the chunk in order and hands out base + running count.
// So every rank is exactly the serial counting sort's. An expert id outside [0, E) (other than
// the plan's -1 for a dropped copy) is treated as dropped: position or dispatch -1.
//
// The gathers run one block per token row (or per copy for unpermute_bwd), threads over C.
// Positions outside [0, M) are skipped (see runtime/cuda/kernels.h).
#include "runtime/cuda/common.cuh"
#include "runtime/cuda/launchers.h"

namespace moeforge::cuda::launch {
namespace {

constexpr int64_t kChunk = 1024;
constexpr int kThreads = 256;

// The id of element i of a strided sequence, or -1 when it takes no rank.
__device__ __forceinline__ int32_t id_at(const int32_t* ids, int64_t i, int64_t stride, int64_t e) {
  const int32_t x = ids[i * stride];
  return x >= 0 && x < e ? x : -1;
}

__global__ void chunk_histogram_kernel(const int32_t* ids, int64_t count, int64_t stride, int64_t e, int64_t* hist) {
  extern __shared__ int32_t counts[];
  for (int64_t j = threadIdx.x; j < e; j += blockDim.x) counts[j] = 0;
  __syncthreads();
  const int64_t begin = blockIdx.x * kChunk, end = min(count, begin + kChunk);
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const int32_t x = id_at(ids, i, stride, e);
    if (x >= 0) atomicAdd(&counts[x], 1);
  }
  __syncthreads();
  for (int64_t j = threadIdx.x; j < e; j += blockDim.x) hist[blockIdx.x * e + j] = counts[j];
}

// hist (chunks, E) becomes, per expert, the base + exclusive prefix over the chunks. With
// offsets (E+1) given (the plan), the base is the expert's first row, computed here first from
// the totals; otherwise base (E) is read.
__global__ void chunk_scan_kernel(int64_t* hist, int64_t chunks, int64_t e, const int64_t* base, int64_t* offsets) {
  if (offsets) {
    for (int64_t j = threadIdx.x; j < e; j += blockDim.x) {
      int64_t total = 0;
      for (int64_t c = 0; c < chunks; ++c) total += hist[c * e + j];
      offsets[j + 1] = total;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      offsets[0] = 0;
      for (int64_t j = 0; j < e; ++j) offsets[j + 1] += offsets[j];
    }
    __syncthreads();
  }
  for (int64_t j = threadIdx.x; j < e; j += blockDim.x) {
    int64_t running = offsets ? offsets[j] : base[j];
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t h = hist[c * e + j];
      hist[c * e + j] = running;
      running += h;
    }
  }
}

// Thread 0 of each chunk hands out ranks in order. Plan: out = rank (the row). Capacity: out =
// the expert id when rank < capacity, else -1.
__global__ void chunk_assign_kernel(const int32_t* ids, int64_t count, int64_t stride, int64_t e,
                                    const int64_t* prefix, int64_t capacity, int32_t* out) {
  extern __shared__ int64_t cursor[];
  for (int64_t j = threadIdx.x; j < e; j += blockDim.x) cursor[j] = prefix[blockIdx.x * e + j];
  __syncthreads();
  if (threadIdx.x != 0) return;
  const int64_t begin = blockIdx.x * kChunk, end = min(count, begin + kChunk);
  for (int64_t i = begin; i < end; ++i) {
    const int32_t x = id_at(ids, i, stride, e);
    if (x < 0) {
      out[i * stride] = -1;
      continue;
    }
    const int64_t rank = cursor[x]++;
    out[i * stride] = capacity < 0 ? static_cast<int32_t>(rank) : (rank < capacity ? x : -1);
  }
}

cudaError_t stable_ranks(const int32_t* ids, int64_t count, int64_t stride, int64_t e, const int64_t* base,
                         int64_t* offsets, int64_t capacity, int32_t* out, int64_t* hist, cudaStream_t s) {
  const int64_t chunks = rank_chunks(count);
  if (chunks > 0) {
    chunk_histogram_kernel<<<static_cast<unsigned>(chunks), kThreads, e * sizeof(int32_t), s>>>(ids, count, stride, e,
                                                                                                hist);
  }
  chunk_scan_kernel<<<1, kThreads, 0, s>>>(hist, chunks, e, base, offsets);
  if (chunks > 0) {
    chunk_assign_kernel<<<static_cast<unsigned>(chunks), kThreads, e * sizeof(int64_t), s>>>(ids, count, stride, e,
                                                                                             hist, capacity, out);
  }
  return cudaGetLastError();
}

__device__ __forceinline__ bool kept(int32_t p, int64_t m) { return p >= 0 && p < m; }

__global__ void permute_fwd_kernel(const float* x, const int32_t* positions, float* out, int64_t k, int64_t c,
                                   int64_t m) {
  const int64_t n = blockIdx.x;
  for (int64_t j = 0; j < k; ++j) {
    const int32_t p = positions[n * k + j];
    if (!kept(p, m)) continue;
    for (int64_t i = threadIdx.x; i < c; i += blockDim.x) out[p * c + i] = x[n * c + i];
  }
}

__global__ void permute_bwd_kernel(const float* dout, const int32_t* positions, float* dx, int64_t k, int64_t c,
                                   int64_t m) {
  const int64_t n = blockIdx.x;
  for (int64_t i = threadIdx.x; i < c; i += blockDim.x) {
    float s = 0.0f;
    for (int64_t j = 0; j < k; ++j) {
      const int32_t p = positions[n * k + j];
      if (kept(p, m)) s += dout[p * c + i];
    }
    dx[n * c + i] = s;
  }
}

__global__ void unpermute_fwd_kernel(const float* y, const int32_t* positions, const float* weights, float* out,
                                     int64_t k, int64_t c, int64_t m) {
  const int64_t n = blockIdx.x;
  for (int64_t i = threadIdx.x; i < c; i += blockDim.x) {
    float s = 0.0f;
    for (int64_t j = 0; j < k; ++j) {
      const int32_t p = positions[n * k + j];
      if (kept(p, m)) s += weights[n * k + j] * y[p * c + i];
    }
    out[n * c + i] = s;
  }
}

// One block per copy (n, j): dy[p] = w * dout[n], dweights[n, j] = <dout[n], y[p]>.
__global__ void unpermute_bwd_kernel(const float* y, const int32_t* positions, const float* weights,
                                     const float* dout, float* dy, float* dweights, int64_t k, int64_t c, int64_t m) {
  __shared__ float scratch[32];
  const int64_t copy = blockIdx.x, n = copy / k;
  const int32_t p = positions[copy];
  if (!kept(p, m)) {
    if (threadIdx.x == 0) dweights[copy] = 0.0f;
    return;
  }
  const float w = weights[copy];
  float dot = 0.0f;
  for (int64_t i = threadIdx.x; i < c; i += blockDim.x) {
    const float g = dout[n * c + i];
    dy[p * c + i] = w * g;
    dot += g * y[p * c + i];
  }
  dot = block_sum(dot, scratch);
  if (threadIdx.x == 0) dweights[copy] = dot;
}

int row_threads(int64_t c) { return static_cast<int>(std::max<int64_t>(kWarp, std::min<int64_t>(kThreads, (c + 31) / 32 * 32))); }

}  // namespace

int64_t rank_chunks(int64_t count) { return (count + kChunk - 1) / kChunk; }

cudaError_t moe_plan(const int32_t* experts, int64_t m, int64_t e, int32_t* positions, int64_t* offsets,
                     int64_t* scratch, cudaStream_t s) {
  return stable_ranks(experts, m, 1, e, nullptr, offsets, -1, positions, scratch, s);
}

cudaError_t moe_apply_capacity(const int32_t* experts, int64_t n, int64_t k, int64_t e, int64_t capacity,
                               const int64_t* base, int32_t* dispatch, int64_t* scratch, cudaStream_t s) {
  // Priority order is slot-major: slot j's copies rank after base[j, :], row by row.
  for (int64_t j = 0; j < k; ++j) {
    const cudaError_t st =
        stable_ranks(experts + j, n, k, e, base + j * e, nullptr, capacity, dispatch + j, scratch, s);
    if (st != cudaSuccess) return st;
  }
  return cudaSuccess;
}

cudaError_t moe_permute_fwd(const float* x, const int32_t* positions, float* out, int64_t n, int64_t k, int64_t c,
                            int64_t m, cudaStream_t s) {
  permute_fwd_kernel<<<static_cast<unsigned>(n), row_threads(c), 0, s>>>(x, positions, out, k, c, m);
  return cudaGetLastError();
}

cudaError_t moe_permute_bwd(const float* dout, const int32_t* positions, float* dx, int64_t n, int64_t k, int64_t c,
                            int64_t m, cudaStream_t s) {
  permute_bwd_kernel<<<static_cast<unsigned>(n), row_threads(c), 0, s>>>(dout, positions, dx, k, c, m);
  return cudaGetLastError();
}

cudaError_t moe_unpermute_fwd(const float* y, const int32_t* positions, const float* weights, float* out, int64_t n,
                              int64_t k, int64_t c, int64_t m, cudaStream_t s) {
  unpermute_fwd_kernel<<<static_cast<unsigned>(n), row_threads(c), 0, s>>>(y, positions, weights, out, k, c, m);
  return cudaGetLastError();
}

cudaError_t moe_unpermute_bwd(const float* y, const int32_t* positions, const float* weights, const float* dout,
                              float* dy, float* dweights, int64_t n, int64_t k, int64_t c, int64_t m, cudaStream_t s) {
  unpermute_bwd_kernel<<<static_cast<unsigned>(n * k), row_threads(c), 0, s>>>(y, positions, weights, dout, dy,
                                                                               dweights, k, c, m);
  return cudaGetLastError();
}

}  // namespace moeforge::cuda::launch
