// CUDA embedding lookup and its backward.
//
// The backward is deterministic without float atomics, like the CPU one: the positions are sorted
// by their table row with CUB's radix sort (stable, so each row's positions stay in ascending
// order; ids of other shards get the key `rows` and sort last), and one block per run of equal
// keys adds that run's gradient rows in order.
#include <cub/device/device_radix_sort.cuh>

#include "runtime/cuda/common.cuh"
#include "runtime/cuda/launchers.h"

namespace moeforge::cuda::launch {
namespace {

constexpr int kThreads = 256;

// Row i of out: table row ids[i] - vocab_start (widened from T, rounded to O), in vectors of V
// elements (V = 8: 16-byte accesses, c % 8 == 0 and aligned rows; V = 1 otherwise).
template <int V, class T, class O>
__global__ void embedding_fwd_kernel(const int32_t* ids, const T* table, O* out, int64_t rows, int64_t c,
                                     int64_t vocab_start, int64_t vocab_size) {
  const int64_t i = blockIdx.x;
  const int32_t id = ids[i];
  const int64_t r = id - vocab_start;
  O* dst = out + i * c;
  // A bad id cannot raise an Error from here: its row becomes NaN (see kernels.h).
  const float fill = id < 0 || id >= vocab_size ? NAN : 0.0f;
  const bool here = id >= 0 && id < vocab_size && r >= 0 && r < rows;
  for (int64_t j = threadIdx.x * int64_t{V}; j < c; j += int64_t{blockDim.x} * V) {
    float v[V];
    if (here) {
      load_f32<V>(table + r * c + j, v);
    } else {
#pragma unroll
      for (int t = 0; t < V; ++t) v[t] = fill;
    }
    store_f32<V>(dst + j, v);
  }
}

__global__ void embedding_keys_kernel(const int32_t* ids, int64_t n, int64_t rows, int64_t vocab_start,
                                      int64_t vocab_size, int32_t* keys, int32_t* positions) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    const int32_t id = ids[i];
    const int64_t r = id - vocab_start;
    keys[i] = id >= 0 && id < vocab_size && r >= 0 && r < rows ? static_cast<int32_t>(r) : static_cast<int32_t>(rows);
    positions[i] = static_cast<int32_t>(i);
  }
}

// Block b starts a run iff its sorted key differs from the previous one; it then owns that table
// row and adds the run's gradient rows in (ascending position) order.
template <class G, class W>
__global__ void embedding_bwd_kernel(const int32_t* keys, const int32_t* positions, int64_t n, int64_t rows,
                                     const G* dout, W* dtable, int64_t c) {
  const int64_t b = blockIdx.x;
  const int32_t key = keys[b];
  if (key >= rows || (b > 0 && keys[b - 1] == key)) return;
  int64_t end = b + 1;
  while (end < n && keys[end] == key) ++end;
  W* dst = dtable + static_cast<int64_t>(key) * c;
  for (int64_t j = threadIdx.x; j < c; j += blockDim.x) {
    float s = to_f32(dst[j]);  // the run is summed in f32 and rounded once into dtable
    for (int64_t i = b; i < end; ++i) s += to_f32(dout[static_cast<int64_t>(positions[i]) * c + j]);
    dst[j] = from_f32<W>(s);
  }
}

// Keys are in [0, rows]: the sort needs that many bits.
int key_bits(int64_t rows) {
  int bits = 1;
  while ((int64_t{1} << bits) <= rows) ++bits;
  return bits;
}

int row_threads(int64_t c) { return static_cast<int>(std::max<int64_t>(kWarp, std::min<int64_t>(kThreads, (c + 31) / 32 * 32))); }

}  // namespace

cudaError_t embedding_fwd(const int32_t* ids, int64_t n, const void* table, DType table_dtype, int64_t rows,
                          int64_t c, void* out, DType out_dtype, int64_t vocab_start, int64_t vocab_size,
                          cudaStream_t s) {
  return with_storage2(table_dtype, out_dtype, [&](auto tt, auto to) {
    using T = decltype(tt);
    using O = decltype(to);
    const auto* pt = static_cast<const T*>(table);
    auto* po = static_cast<O*>(out);
    const unsigned blocks = static_cast<unsigned>(n);
    if (c % 8 == 0 && aligned16({pt, po}))
      embedding_fwd_kernel<8><<<blocks, row_threads((c + 7) / 8), 0, s>>>(ids, pt, po, rows, c, vocab_start,
                                                                          vocab_size);
    else
      embedding_fwd_kernel<1><<<blocks, row_threads(c), 0, s>>>(ids, pt, po, rows, c, vocab_start, vocab_size);
    return cudaGetLastError();
  });
}

size_t embedding_bwd_temp_bytes(int64_t n, int64_t rows) {
  size_t bytes = 0;
  const cudaError_t st = cub::DeviceRadixSort::SortPairs(nullptr, bytes, static_cast<const int32_t*>(nullptr),
                                                         static_cast<int32_t*>(nullptr),
                                                         static_cast<const int32_t*>(nullptr),
                                                         static_cast<int32_t*>(nullptr), static_cast<int>(n), 0,
                                                         key_bits(rows));
  return st == cudaSuccess ? bytes : 0;
}

cudaError_t embedding_bwd(const int32_t* ids, int64_t n, const void* dout, DType dout_dtype, void* dtable,
                          DType dtable_dtype, int64_t rows, int64_t c, int64_t vocab_start, int64_t vocab_size,
                          int32_t* keys, int32_t* positions, void* temp,
                          size_t temp_bytes, cudaStream_t s) {
  embedding_keys_kernel<<<grid_for(n, kThreads), kThreads, 0, s>>>(ids, n, rows, vocab_start, vocab_size, keys,
                                                                   positions);
  cudaError_t st = cudaGetLastError();
  if (st != cudaSuccess) return st;
  st = cub::DeviceRadixSort::SortPairs(temp, temp_bytes, keys, keys + n, positions, positions + n,
                                       static_cast<int>(n), 0, key_bits(rows), s);
  if (st != cudaSuccess) return st;
  return with_storage2(dout_dtype, dtable_dtype, [&](auto tg, auto tw) {
    using G = decltype(tg);
    using W = decltype(tw);
    embedding_bwd_kernel<<<static_cast<unsigned>(n), row_threads(c), 0, s>>>(
        keys + n, positions + n, n, rows, static_cast<const G*>(dout), static_cast<W*>(dtable), c);
    return cudaGetLastError();
  });
}

}  // namespace moeforge::cuda::launch
