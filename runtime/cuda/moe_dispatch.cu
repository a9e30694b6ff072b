// CUDA dispatch plan, capacity dropping, and the permute / unpermute row gathers (contracts in
// runtime/ops.h; launch sizes planned in runtime/cuda/routing_plan.h).
//
// Both the plan and the capacity rule need stable ranks: for each element of a sequence of expert
// ids, how many earlier elements have the same expert. A counting sort without float or order-
// dependent atomics (the steps and their invariants are in routing_plan.h):
//   1. tile_histogram_kernel: per tile, integer shared-memory counters (order-free);
//   2. tile_scan_kernel: per expert, the exclusive prefix of its tile counts in tile order, and
//      its total;
//   3. offsets_kernel (plan only): offsets = exclusive scan of the totals;
//   4. tile_scatter_kernel: one warp per tile walks it 32 ids at a time in order; the lanes
//      holding the same expert find each other with __match_any_sync and take consecutive ranks
//      in lane order, so rank = base[e] + tile prefix + ids of e earlier in the tile.
// So every rank is exactly the serial counting sort's. An expert id outside [0, E) (other than
// the plan's -1 for a dropped copy) is treated as dropped: position or dispatch -1.
//
// The gathers run one block per token row (or per copy for unpermute_bwd), threads over C, in
// 16-byte vectors (4 floats or 8 bf16) when the rows are 16-byte aligned (common.cuh's vec16_ok),
// rows of f32 or bf16 (f32 sums, one rounding per stored element). Positions
// outside [0, M) are skipped (see runtime/cuda/kernels.h). Every output element is produced by
// one thread with the CPU's summation order over the copies k.
#include <initializer_list>

#include "runtime/cuda/common.cuh"
#include "runtime/cuda/launchers.h"
#include "runtime/cuda/routing_plan.h"

namespace moeforge::cuda::launch {
namespace {

using routing::RankPlan;

// The id of element i of a strided sequence, or -1 when it takes no rank.
__device__ __forceinline__ int32_t id_at(const int32_t* ids, int64_t i, int64_t stride, int64_t e) {
  const int32_t x = ids[i * stride];
  return x >= 0 && x < e ? x : -1;
}

// hist (tiles, E): hist[t, x] = ids of expert x in tile t.
__global__ void tile_histogram_kernel(const int32_t* ids, int64_t count, int64_t stride, int64_t e, int64_t tile,
                                      int32_t* hist) {
  extern __shared__ int32_t counts[];
  for (int64_t j = threadIdx.x; j < e; j += blockDim.x) counts[j] = 0;
  __syncthreads();
  const int64_t begin = blockIdx.x * tile, end = min(count, begin + tile);
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const int32_t x = id_at(ids, i, stride, e);
    if (x >= 0) atomicAdd(&counts[x], 1);
  }
  __syncthreads();
  for (int64_t j = threadIdx.x; j < e; j += blockDim.x) hist[blockIdx.x * e + j] = counts[j];
}

// Inclusive scan over the block (blockDim.x a multiple of 32); *total receives the block's sum.
// scratch holds 32 values; the call ends with a barrier.
template <class T>
__device__ T block_inclusive_scan(T v, T* scratch, T* total) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  for (int o = 1; o < kWarp; o *= 2) {
    const T u = __shfl_up_sync(0xffffffffu, v, o);
    if (lane >= o) v += u;
  }
  if (lane == kWarp - 1) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    T w = lane < warps ? scratch[lane] : T(0);
    for (int o = 1; o < kWarp; o *= 2) {
      const T u = __shfl_up_sync(0xffffffffu, w, o);
      if (lane >= o) w += u;
    }
    scratch[lane] = w;  // inclusive prefix of the warp sums
  }
  __syncthreads();
  if (warp > 0) v += scratch[warp - 1];
  *total = scratch[warps - 1];
  __syncthreads();
  return v;
}

// Block j: column j of hist (tiles, E) becomes its exclusive prefix over the tiles, in
// partitions of blockDim.x tiles; totals[j] = the column's sum.
__global__ void tile_scan_kernel(int32_t* hist, int64_t tiles, int64_t e, int32_t* totals) {
  __shared__ int32_t scratch[32];
  const int64_t j = blockIdx.x;
  int32_t carry = 0;
  for (int64_t t0 = 0; t0 < tiles; t0 += blockDim.x) {
    const int64_t t = t0 + threadIdx.x;
    const int32_t v = t < tiles ? hist[t * e + j] : 0;
    int32_t sum = 0;
    const int32_t incl = block_inclusive_scan(v, scratch, &sum);
    if (t < tiles) hist[t * e + j] = carry + incl - v;
    carry += sum;
  }
  if (threadIdx.x == 0) totals[j] = carry;
}

// One block: offsets (E+1) = 0 followed by the inclusive scan of totals (E).
__global__ void offsets_kernel(const int32_t* totals, int64_t e, int64_t* offsets) {
  __shared__ int64_t scratch[32];
  int64_t carry = 0;
  if (threadIdx.x == 0) offsets[0] = 0;
  for (int64_t j0 = 0; j0 < e; j0 += blockDim.x) {
    const int64_t j = j0 + threadIdx.x;
    const int64_t v = j < e ? totals[j] : 0;
    int64_t sum = 0;
    const int64_t incl = block_inclusive_scan(v, scratch, &sum);
    if (j < e) offsets[j + 1] = carry + incl;
    carry += sum;
  }
}

// Warp w of block b walks tile t = b * warps + w in order. cursor (per warp, E int32) starts at
// the tile's prefix and counts the ids of each expert handed out so far. Plan (capacity < 0):
// out = base[x] + rank, the row. Capacity: out = x when base[x] + rank < capacity, else -1.
__global__ void tile_scatter_kernel(const int32_t* ids, int64_t count, int64_t stride, int64_t e, int64_t tile,
                                    int64_t tiles, const int32_t* prefix, const int64_t* base, int64_t capacity,
                                    int32_t* out) {
  extern __shared__ int32_t cursors[];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  const int64_t t = blockIdx.x * int64_t{warps} + warp;
  if (t >= tiles) return;  // whole warps leave; no block barrier follows
  int32_t* cursor = cursors + warp * e;
  for (int64_t j = lane; j < e; j += kWarp) cursor[j] = prefix[t * e + j];
  __syncwarp();
  const unsigned lower = (1u << lane) - 1u;  // the lanes before this one
  const int64_t begin = t * tile, end = min(count, begin + tile);
  // Batches of kBatch steps of 32 ids: the batch's loads are issued together (they do not depend
  // on the ranks), then its steps run in order.
  constexpr int kBatch = 8;
  for (int64_t b0 = begin; b0 < end; b0 += kBatch * kWarp) {
    int32_t xs[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int64_t i = b0 + u * kWarp + lane;
      xs[u] = i < end ? id_at(ids, i, stride, e) : -1;
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int64_t i = b0 + u * kWarp + lane;
      const int32_t x = xs[u];
      // Lanes with the same id (dropped and past-the-end lanes form their own group, ignored).
      const unsigned peers = __match_any_sync(0xffffffffu, x);
      const int32_t before = x >= 0 ? cursor[x] : 0;
      // Every lane of a group has read the cursor before its last lane advances it.
      __syncwarp();
      if (x >= 0 && lane == 31 - __clz(peers)) cursor[x] = before + __popc(peers);
      __syncwarp();
      if (i >= end) continue;
      if (x < 0) {
        out[i * stride] = -1;
        continue;
      }
      const int64_t rank = base[x] + before + __popc(peers & lower);
      out[i * stride] = capacity < 0 ? static_cast<int32_t>(rank) : (rank < capacity ? x : -1);
    }
  }
}

// The four steps on the stream. scratch: plan.scratch_i32 int32. offsets (plan) or base
// (capacity) gives the per-expert base.
cudaError_t stable_ranks(const int32_t* ids, int64_t count, int64_t stride, int64_t e, const int64_t* base,
                         int64_t* offsets, int64_t capacity, int32_t* out, int32_t* scratch, cudaStream_t s) {
  const RankPlan p = routing::plan_ranks(count, e);
  int32_t* hist = scratch;
  int32_t* totals = scratch + p.tiles * e;
  if (p.tiles > 0) {
    tile_histogram_kernel<<<static_cast<unsigned>(p.tiles), routing::kRankThreads, p.hist_smem, s>>>(
        ids, count, stride, e, p.tile, hist);
  }
  tile_scan_kernel<<<static_cast<unsigned>(e), routing::kScanThreads, 0, s>>>(hist, p.tiles, e, totals);
  if (offsets) {
    offsets_kernel<<<1, routing::kRankThreads, 0, s>>>(totals, e, offsets);
    base = offsets;
  }
  if (p.tiles > 0) {
    tile_scatter_kernel<<<static_cast<unsigned>(p.scatter_blocks), p.scatter_warps * kWarp, p.scatter_smem, s>>>(
        ids, count, stride, e, p.tile, p.tiles, hist, base, capacity, out);
  }
  return cudaGetLastError();
}

__device__ __forceinline__ bool kept(int32_t p, int64_t m) { return p >= 0 && p < m; }

// V consecutive elements of a row of T (float or __nv_bfloat16), widened to f32: one 16-byte
// access when V == kVec16<T> (4 floats, 8 bf16; vec16_ok checked alignment) or one element.
template <int V>
struct Vec {
  float v[V];
};

template <int V, class T>
__device__ __forceinline__ Vec<V> load(const T* p) {
  Vec<V> r;
  load_f32<V>(p, r.v);
  return r;
}

template <int V, class T>
__device__ __forceinline__ void store(T* p, const Vec<V>& r) {
  store_f32<V>(p, r.v);
}

// Rows are c elements of T, cv = c / V vectors; vector i of row r starts at element (r * cv + i) * V.
// Sums are f32, each output element rounded once to T.

// Block n: x[n] is read once and written to each kept copy's row.
template <int V, class T>
__global__ void permute_fwd_kernel(const T* x, const int32_t* positions, T* out, int64_t k, int64_t cv,
                                   int64_t m) {
  const int64_t n = blockIdx.x;
  const int32_t* pos = positions + n * k;
  for (int64_t i = threadIdx.x; i < cv; i += blockDim.x) {
    const Vec<V> v = load<V>(x + (n * cv + i) * V);
    for (int64_t j = 0; j < k; ++j) {
      const int32_t p = pos[j];
      if (kept(p, m)) store<V>(out + (int64_t{p} * cv + i) * V, v);
    }
  }
}

// Block n: dx[n] = sum over the kept copies in k order.
template <int V, class T>
__global__ void permute_bwd_kernel(const T* dout, const int32_t* positions, T* dx, int64_t k, int64_t cv,
                                   int64_t m) {
  const int64_t n = blockIdx.x;
  const int32_t* pos = positions + n * k;
  for (int64_t i = threadIdx.x; i < cv; i += blockDim.x) {
    Vec<V> s{};
    for (int64_t j = 0; j < k; ++j) {
      const int32_t p = pos[j];
      if (!kept(p, m)) continue;
      const Vec<V> g = load<V>(dout + (int64_t{p} * cv + i) * V);
      for (int t = 0; t < V; ++t) s.v[t] += g.v[t];
    }
    store<V>(dx + (n * cv + i) * V, s);
  }
}

// Block n: out[n] = sum over the kept copies in k order of weights[n, j] * y[positions[n, j]].
template <int V, class T>
__global__ void unpermute_fwd_kernel(const T* y, const int32_t* positions, const float* weights, T* out,
                                     int64_t k, int64_t cv, int64_t m) {
  const int64_t n = blockIdx.x;
  const int32_t* pos = positions + n * k;
  const float* w = weights + n * k;
  for (int64_t i = threadIdx.x; i < cv; i += blockDim.x) {
    Vec<V> s{};
    for (int64_t j = 0; j < k; ++j) {
      const int32_t p = pos[j];
      if (!kept(p, m)) continue;
      const Vec<V> u = load<V>(y + (int64_t{p} * cv + i) * V);
      for (int t = 0; t < V; ++t) s.v[t] += w[j] * u.v[t];
    }
    store<V>(out + (n * cv + i) * V, s);
  }
}

// One block per copy (n, j): dy[p] = w * dout[n], dweights[n, j] = <dout[n], y[p]>.
template <int V, class T>
__global__ void unpermute_bwd_kernel(const T* y, const int32_t* positions, const float* weights, const T* dout,
                                     T* dy, float* dweights, int64_t k, int64_t cv, int64_t m) {
  __shared__ float scratch[32];
  const int64_t copy = blockIdx.x, n = copy / k;
  const int32_t p = positions[copy];
  if (!kept(p, m)) {
    if (threadIdx.x == 0) dweights[copy] = 0.0f;
    return;  // the whole block: p is block-uniform, so no thread reaches block_sum's barriers
  }
  const float w = weights[copy];
  float dot = 0.0f;
  for (int64_t i = threadIdx.x; i < cv; i += blockDim.x) {
    const Vec<V> g = load<V>(dout + (n * cv + i) * V);
    const Vec<V> u = load<V>(y + (int64_t{p} * cv + i) * V);
    Vec<V> d;
    for (int t = 0; t < V; ++t) {
      d.v[t] = w * g.v[t];
      dot += g.v[t] * u.v[t];
    }
    store<V>(dy + (int64_t{p} * cv + i) * V, d);
  }
  dot = block_sum(dot, scratch);
  if (threadIdx.x == 0) dweights[copy] = dot;
}

}  // namespace

cudaError_t moe_plan(const int32_t* experts, int64_t m, int64_t e, int32_t* positions, int64_t* offsets,
                     int32_t* scratch, cudaStream_t s) {
  return stable_ranks(experts, m, 1, e, nullptr, offsets, -1, positions, scratch, s);
}

cudaError_t moe_apply_capacity(const int32_t* experts, int64_t n, int64_t k, int64_t e, int64_t capacity,
                               const int64_t* base, int32_t* dispatch, int32_t* scratch, cudaStream_t s) {
  // Priority order is slot-major: slot j's copies rank after base[j, :], row by row. The slots
  // run one after the other on the stream, so they share the scratch.
  for (int64_t j = 0; j < k; ++j) {
    const cudaError_t st =
        stable_ranks(experts + j, n, k, e, base + j * e, nullptr, capacity, dispatch + j, scratch, s);
    if (st != cudaSuccess) return st;
  }
  return cudaSuccess;
}

// The gathers: one block per row (per copy for unpermute_bwd), routing::row_threads threads,
// 16-byte vectors (4 floats, 8 bf16) when vec16_ok allows. x/out, dout/dx, y/dout/dy: one dtype.
#define MOE_ROW_GATHER(kernel, blocks, c, vec, ...)                                                      \
  do {                                                                                                   \
    constexpr int kV = kVec16<T>;                                                                        \
    if (vec)                                                                                             \
      kernel<kV><<<(blocks), routing::row_threads(c, kV), 0, s>>>(__VA_ARGS__, (c) / kV, m);             \
    else                                                                                                 \
      kernel<1><<<(blocks), routing::row_threads(c, 1), 0, s>>>(__VA_ARGS__, (c), m);                   \
  } while (0)

cudaError_t moe_permute_fwd(const void* x, const int32_t* positions, void* out, DType dtype, int64_t n, int64_t k,
                            int64_t c, int64_t m, cudaStream_t s) {
  return with_storage(dtype, [&](auto tag) {
    using T = decltype(tag);
    const auto* px = static_cast<const T*>(x);
    auto* po = static_cast<T*>(out);
    const bool vec = vec16_ok<T>(c, {px, po});
    MOE_ROW_GATHER(permute_fwd_kernel, static_cast<unsigned>(n), c, vec, px, positions, po, k);
    return cudaGetLastError();
  });
}

cudaError_t moe_permute_bwd(const void* dout, const int32_t* positions, void* dx, DType dtype, int64_t n, int64_t k,
                            int64_t c, int64_t m, cudaStream_t s) {
  return with_storage(dtype, [&](auto tag) {
    using T = decltype(tag);
    const auto* pd = static_cast<const T*>(dout);
    auto* px = static_cast<T*>(dx);
    const bool vec = vec16_ok<T>(c, {pd, px});
    MOE_ROW_GATHER(permute_bwd_kernel, static_cast<unsigned>(n), c, vec, pd, positions, px, k);
    return cudaGetLastError();
  });
}

cudaError_t moe_unpermute_fwd(const void* y, const int32_t* positions, const float* weights, void* out, DType dtype,
                              int64_t n, int64_t k, int64_t c, int64_t m, cudaStream_t s) {
  return with_storage(dtype, [&](auto tag) {
    using T = decltype(tag);
    const auto* py = static_cast<const T*>(y);
    auto* po = static_cast<T*>(out);
    const bool vec = vec16_ok<T>(c, {py, po});
    MOE_ROW_GATHER(unpermute_fwd_kernel, static_cast<unsigned>(n), c, vec, py, positions, weights, po, k);
    return cudaGetLastError();
  });
}

cudaError_t moe_unpermute_bwd(const void* y, const int32_t* positions, const float* weights, const void* dout,
                              void* dy, float* dweights, DType dtype, int64_t n, int64_t k, int64_t c, int64_t m,
                              cudaStream_t s) {
  return with_storage(dtype, [&](auto tag) {
    using T = decltype(tag);
    const auto* py = static_cast<const T*>(y);
    const auto* pd = static_cast<const T*>(dout);
    auto* pdy = static_cast<T*>(dy);
    const bool vec = vec16_ok<T>(c, {py, pd, pdy});
    MOE_ROW_GATHER(unpermute_bwd_kernel, static_cast<unsigned>(n * k), c, vec, py, positions, weights, pd, pdy,
                   dweights, k);
    return cudaGetLastError();
  });
}

#undef MOE_ROW_GATHER

}  // namespace moeforge::cuda::launch
