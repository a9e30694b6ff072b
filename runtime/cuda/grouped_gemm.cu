// CUDA grouped expert GEMM: one launch covers every expert, reading the expert row ranges from
// the device offsets (the host never learns them, so nothing waits).
//
// The kernel is a classic shared-memory tiled SGEMM (64 x 64 output tile, 16-deep k slices, 4 x 4
// outputs per thread) over strided operand views, so the forward, dx and dw products are the
// same code with different strides. Operands are templated on their storage types (float or
// __nv_bfloat16): tiles are widened to f32 in shared memory, products accumulate in f32 and each
// output is rounded once to its type (dw may be f32 while x and dout are bf16: the bf16 products
// accumulate straight into the fp32 master gradient).
//
// Why this kernel and not cuBLAS for bf16: the expert row ranges live only in device memory
// (offsets from moe_plan). Per-expert cuBLASLt calls and cublasGemmGroupedBatchedEx both take
// each group's m, n, k from the host, which would cost a device-to-host copy and a stream
// synchronisation per grouped GEMM (six per MoE layer and step) and stall the CPU's launch
// queue. Keeping the one-launch, device-offsets design is worth more than the tensor cores for
// now; the follow-up is a tensor-core (mma/wgmma) tile body in tile_gemm with the same grid, or
// CUTLASS's grouped GEMM with device-side problem sizes.
//
// Row tiles of the forward and dx products: expert e has ceil(rows_e / 64) of them, so all
// experts together have at most ceil(M / 64) + E; the grid has that many, and block x finds its
// expert by walking the offsets (E is at most a few hundred). dw runs one grid layer per expert
// and sums over that expert's rows in order: deterministic. Offsets outside [0, M] or decreasing
// are clamped into range rather than read out of bounds (see runtime/cuda/kernels.h).
#include "runtime/cuda/common.cuh"
#include "runtime/cuda/launchers.h"

namespace moeforge::cuda::launch {
namespace {

constexpr int kBM = 64, kBN = 64, kBK = 16, kThreads = 256;

// A strided matrix view: element (i, j) at p[i * rs + j * cs].
// Elements are of storage type T, read widened to f32.
template <class T>
struct View {
  const T* p;
  int64_t rs, cs;
  __device__ __forceinline__ float at(int64_t i, int64_t j) const { return to_f32(p[i * rs + j * cs]); }
};

// c (rows, cols) (+)= a (rows, kdim) · b (kdim, cols), for the tile at (row0, col0); f32
// accumulation, one rounding to C per element (after adding the old value when accumulating).
template <class A, class B, class C>
__device__ void tile_gemm(View<A> a, View<B> b, C* c, int64_t ldc, int64_t rows, int64_t cols, int64_t kdim,
                          int64_t row0, int64_t col0, bool accumulate) {
  __shared__ float as[kBK][kBM + 1];
  __shared__ float bs[kBK][kBN + 1];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  float acc[4][4] = {};
  for (int64_t k0 = 0; k0 < kdim; k0 += kBK) {
    for (int e = threadIdx.x; e < kBK * kBM; e += kThreads) {
      const int kk = e / kBM, i = e % kBM;
      const int64_t gi = row0 + i, gk = k0 + kk;
      as[kk][i] = gi < rows && gk < kdim ? a.at(gi, gk) : 0.0f;
    }
    for (int e = threadIdx.x; e < kBK * kBN; e += kThreads) {
      const int kk = e / kBN, j = e % kBN;
      const int64_t gj = col0 + j, gk = k0 + kk;
      bs[kk][j] = gj < cols && gk < kdim ? b.at(gk, gj) : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBK; ++kk) {
      float ar[4], br[4];
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        ar[r] = as[kk][ty + 16 * r];
        br[r] = bs[kk][tx + 16 * r];
      }
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int s = 0; s < 4; ++s) acc[r][s] += ar[r] * br[s];
    }
    __syncthreads();
  }
#pragma unroll
  for (int r = 0; r < 4; ++r)
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      const int64_t i = row0 + ty + 16 * r, j = col0 + tx + 16 * s;
      if (i < rows && j < cols)
        c[i * ldc + j] = from_f32<C>(accumulate ? to_f32(c[i * ldc + j]) + acc[r][s] : acc[r][s]);
    }
}

__device__ __forceinline__ int64_t clamp_offset(const int64_t* offsets, int64_t e, int64_t lo, int64_t m) {
  return min(max(offsets[e], lo), m);
}

struct RowTile {
  int64_t expert, begin, rows, row0;  // expert -1: this block has no tile
};

// The expert and row tile of block x.
__device__ RowTile find_row_tile(const int64_t* offsets, int64_t num_experts, int64_t m) {
  __shared__ RowTile tile;
  if (threadIdx.x == 0) {
    tile = {-1, 0, 0, 0};
    int64_t tiles = 0, start = 0;
    for (int64_t e = 0; e < num_experts; ++e) {
      const int64_t b = clamp_offset(offsets, e, start, m), end = clamp_offset(offsets, e + 1, b, m);
      start = end;
      const int64_t t = (end - b + kBM - 1) / kBM;
      if (blockIdx.x < tiles + t) {
        tile = {e, b, end - b, (blockIdx.x - tiles) * kBM};
        break;
      }
      tiles += t;
    }
  }
  __syncthreads();
  return tile;
}

// out_e (rows_e, Cout) = x_e (rows_e, Cin) · w_eᵀ.
template <class T>
__global__ void grouped_fwd_kernel(const T* x, const T* w, const int64_t* offsets, T* out, int64_t m,
                                   int64_t num_experts, int64_t cin, int64_t cout) {
  const RowTile t = find_row_tile(offsets, num_experts, m);
  if (t.expert < 0) return;
  const View<T> a{x + t.begin * cin, cin, 1};
  const View<T> b{w + t.expert * cout * cin, 1, cin};  // b(k, j) = w_e[j, k]
  tile_gemm(a, b, out + t.begin * cout, cout, t.rows, cout, cin, t.row0, blockIdx.y * int64_t{kBN}, false);
}

// dx_e (rows_e, Cin) = dout_e (rows_e, Cout) · w_e.
template <class T>
__global__ void grouped_dx_kernel(const T* dout, const T* w, const int64_t* offsets, T* dx, int64_t m,
                                  int64_t num_experts, int64_t cin, int64_t cout) {
  const RowTile t = find_row_tile(offsets, num_experts, m);
  if (t.expert < 0) return;
  const View<T> a{dout + t.begin * cout, cout, 1};
  const View<T> b{w + t.expert * cout * cin, cin, 1};
  tile_gemm(a, b, dx + t.begin * cin, cin, t.rows, cin, cout, t.row0, blockIdx.y * int64_t{kBN}, false);
}

// dw_e (Cout, Cin) += dout_eᵀ · x_e; grid layer z is expert z.
template <class T, class W>
__global__ void grouped_dw_kernel(const T* x, const T* dout, const int64_t* offsets, W* dw, int64_t m,
                                  int64_t cin, int64_t cout) {
  const int64_t e = blockIdx.z;
  int64_t start = 0, begin = 0, end = 0;
  for (int64_t i = 0; i <= e; ++i) {  // the same clamping as find_row_tile
    begin = clamp_offset(offsets, i, start, m);
    end = clamp_offset(offsets, i + 1, begin, m);
    start = end;
  }
  const View<T> a{dout + begin * cout, 1, cout};  // a(i, k) = dout[begin + k, i]
  const View<T> b{x + begin * cin, cin, 1};
  tile_gemm(a, b, dw + e * cout * cin, cin, cout, cin, end - begin, blockIdx.x * int64_t{kBM},
            blockIdx.y * int64_t{kBN}, true);
}

unsigned tiles(int64_t n, int tile) { return static_cast<unsigned>((n + tile - 1) / tile); }

}  // namespace

cudaError_t grouped_gemm_fwd(const void* x, const void* w, const int64_t* offsets, void* out, DType dtype, int64_t m,
                             int64_t num_experts, int64_t cin, int64_t cout, cudaStream_t s) {
  return with_storage(dtype, [&](auto tag) {
    using T = decltype(tag);
    const dim3 grid(tiles(m, kBM) + static_cast<unsigned>(num_experts), tiles(cout, kBN));
    grouped_fwd_kernel<<<grid, kThreads, 0, s>>>(static_cast<const T*>(x), static_cast<const T*>(w), offsets,
                                                 static_cast<T*>(out), m, num_experts, cin, cout);
    return cudaGetLastError();
  });
}

cudaError_t grouped_gemm_bwd(const void* x, const void* w, const int64_t* offsets, const void* dout, void* dx,
                             void* dw, DType dtype, DType dw_dtype, int64_t m, int64_t num_experts, int64_t cin,
                             int64_t cout, cudaStream_t s) {
  return with_storage2(dtype, dw_dtype, [&](auto tag, auto tw) {
    using T = decltype(tag);
    using W = decltype(tw);
    if (m > 0) {
      const dim3 grid(tiles(m, kBM) + static_cast<unsigned>(num_experts), tiles(cin, kBN));
      grouped_dx_kernel<<<grid, kThreads, 0, s>>>(static_cast<const T*>(dout), static_cast<const T*>(w), offsets,
                                                  static_cast<T*>(dx), m, num_experts, cin, cout);
    }
    const dim3 grid(tiles(cout, kBM), tiles(cin, kBN), static_cast<unsigned>(num_experts));
    grouped_dw_kernel<<<grid, kThreads, 0, s>>>(static_cast<const T*>(x), static_cast<const T*>(dout), offsets,
                                                static_cast<W*>(dw), m, cin, cout);
    return cudaGetLastError();
  });
}

}  // namespace moeforge::cuda::launch
