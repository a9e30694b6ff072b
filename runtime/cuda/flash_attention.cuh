// Fused causal grouped-query attention on the tensor cores (mma.sync m16n8k16, bf16 in, fp32
// accumulation; sm_80 and newer): the forward of FlashAttention-2 and its backward, as kernel
// templates over the head dim and tiles. One translation unit instantiates each head dim
// (flash_attention_hd64.cu, flash_attention_hd128.cu); flash_attention.cu holds the launchers.
//
// Forward (FA2, Algorithm 1): a block owns a query tile, each warp 16 of its rows, kept as A
// fragments in registers. For each visible key tile the warp computes S = Q Kᵀ in registers,
// masks and scales it (log2 domain: exp2 of s * scale * log2 e), updates the running row max m
// and sum l, rescales O and adds P V, where the S accumulators are re-packed as the A operand
// (the C layout of two adjacent n8 tiles is the A layout of one k16 step). lse = (m + log2 l) ln 2.
//
// Backward (FA2, Algorithm 2, split in two kernels so that no accumulation needs atomics and the
// result is deterministic): with P = exp(S scale - lse) and delta_i = <dO_i, O_i> (a pre-pass),
//   dV_j = sum_i P_ij dO_i,   dS_ij = P_ij (dO_i·V_j - delta_i),
//   dQ_i = scale sum_j dS_ij K_j   (dq kernel: a block per query tile),
//   dK_j = scale sum_i dS_ij Q_i   (dkv kernel: a block per key tile and kv head, looping over the
//                                   H / Hkv query heads of its group and their query tiles).
// The dkv kernel works on the transposed tiles Sᵀ = K Qᵀ so that keys are the warp's rows.
//
// Fragment layouts (PTX ISA, mma.m16n8k16 with .bf16): g = lane / 4, t = lane % 4;
//   A (16x16, row): a0 (g, 2t..2t+1), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..)
//   B (16x8, col):  b0 (k 2t..2t+1, n g), b1 (k 2t+8..2t+9, n g)
//   C (16x8, f32):  c0, c1 (g, 2t..2t+1), c2, c3 (g+8, 2t..2t+1)
// Each 32-bit register packs two bf16, the lower index in the low half.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "runtime/cuda/attention_plan.h"

namespace moeforge::cuda::flash {

using bf16_t = __nv_bfloat16;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---- fragments ----------------------------------------------------------------------------------

__device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ uint32_t ld32(const bf16_t* p) { return *reinterpret_cast<const uint32_t*>(p); }

__device__ __forceinline__ uint32_t pack(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

__device__ __forceinline__ uint32_t pack(bf16_t lo, bf16_t hi) {
  const __nv_bfloat162 v{lo, hi};
  return *reinterpret_cast<const uint32_t*>(&v);
}

// A fragment of rows [r0, r0 + 16), columns [k0, k0 + 16) of a row-major shared tile.
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const bf16_t* s, int ld, int r0, int k0) {
  const int g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
  a[0] = ld32(s + (r0 + g) * ld + k0 + 2 * t);
  a[1] = ld32(s + (r0 + g + 8) * ld + k0 + 2 * t);
  a[2] = ld32(s + (r0 + g) * ld + k0 + 2 * t + 8);
  a[3] = ld32(s + (r0 + g + 8) * ld + k0 + 2 * t + 8);
}

// B fragment with B[k][n] = s[n0 + n][k0 + k]: the tile's rows are B's columns (K for Q Kᵀ).
__device__ __forceinline__ void load_b_rows_n(uint32_t (&b)[2], const bf16_t* s, int ld, int n0, int k0) {
  const int g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
  b[0] = ld32(s + (n0 + g) * ld + k0 + 2 * t);
  b[1] = ld32(s + (n0 + g) * ld + k0 + 2 * t + 8);
}

// B fragment with B[k][n] = s[k0 + k][n0 + n]: the tile's rows are B's k (V for P V).
__device__ __forceinline__ void load_b_rows_k(uint32_t (&b)[2], const bf16_t* s, int ld, int k0, int n0) {
  const int g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
  const bf16_t* p = s + (k0 + 2 * t) * ld + n0 + g;
  b[0] = pack(p[0], p[ld]);
  b[1] = pack(p[8 * ld], p[9 * ld]);
}

// The A fragment of k step j from C accumulators c[nt][4] (n8 tiles 2j and 2j + 1).
template <int kTiles>
__device__ __forceinline__ void acc_to_a(uint32_t (&a)[4], const float (&c)[kTiles][4], int j) {
  a[0] = pack(c[2 * j][0], c[2 * j][1]);
  a[1] = pack(c[2 * j][2], c[2 * j][3]);
  a[2] = pack(c[2 * j + 1][0], c[2 * j + 1][1]);
  a[3] = pack(c[2 * j + 1][2], c[2 * j + 1][3]);
}

// Row and column, within a 16 x (8 kTiles) warp tile, of accumulator element e of n8 tile nt.
__device__ __forceinline__ int acc_row(int e) { return threadIdx.x % 32 / 4 + (e >= 2 ? 8 : 0); }
__device__ __forceinline__ int acc_col(int nt, int e) { return nt * 8 + 2 * (threadIdx.x % 4) + (e & 1); }

// ---- tiles in global and shared memory ---------------------------------------------------------

// A sequence: its first row in the packed row dimension and its length.
struct Seq {
  int64_t start, len;
};
__device__ __forceinline__ Seq sequence(const FlashArgs& a, int64_t b) {
  if (a.cu_seqlens == nullptr) return {b * a.T, a.T};
  // Bad lengths (device memory, unchecked) are clamped to the rows and the planned T, so they
  // cannot make a kernel read or write out of bounds.
  const int64_t s = min(max(int64_t{a.cu_seqlens[b]}, int64_t{0}), a.total_rows);
  const int64_t e = min(max(int64_t{a.cu_seqlens[b + 1]}, s), a.total_rows);
  return {s, min(e - s, a.T)};
}

// Index of (sequence b starting at row `start`, head h, row i) in lse / delta: (B, H, T) dense,
// (H, R) packed.
__device__ __forceinline__ int64_t lse_index(const FlashArgs& a, int64_t b, Seq s, int64_t h, int64_t i) {
  return a.cu_seqlens == nullptr ? (b * a.H + h) * a.T + i : h * a.total_rows + s.start + i;
}

// Copies rows [r0, r0 + kRows) of head h of a (rows, heads, D) bf16 tensor into a padded shared
// tile, zero-filling rows at or past `len`. 16-byte vectors, all threads of the block.
template <int kRows, int kD>
__device__ __forceinline__ void stage(bf16_t* s, const bf16_t* g, int64_t heads, int64_t h, Seq seq, int64_t r0) {
  constexpr int kVecs = kD / 8, ld = kD + kSmemPad;
  for (int v = threadIdx.x; v < kRows * kVecs; v += kFlashThreads) {
    const int r = v / kVecs, c = v % kVecs * 8;
    uint4 x = make_uint4(0, 0, 0, 0);
    if (r0 + r < seq.len) x = *reinterpret_cast<const uint4*>(g + ((seq.start + r0 + r) * heads + h) * kD + c);
    *reinterpret_cast<uint4*>(s + r * ld + c) = x;
  }
}

// Writes a warp's 16 x kD fp32 accumulators (times `mul`) as bf16 rows [r0, r0 + 16) of head h.
template <int kD>
__device__ __forceinline__ void store_rows(bf16_t* g, int64_t heads, int64_t h, Seq seq, int64_t r0,
                                           const float (&acc)[kD / 8][4], float mul_lo, float mul_hi) {
#pragma unroll
  for (int dt = 0; dt < kD / 8; ++dt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int64_t r = r0 + acc_row(2 * half);
      if (r >= seq.len) continue;
      const float mul = half ? mul_hi : mul_lo;
      *reinterpret_cast<__nv_bfloat162*>(g + ((seq.start + r) * heads + h) * kD + acc_col(dt, 0)) =
          __floats2bfloat162_rn(acc[dt][2 * half] * mul, acc[dt][2 * half + 1] * mul);
    }
  }
}

template <int kTiles>
__device__ __forceinline__ void zero(float (&c)[kTiles][4]) {
#pragma unroll
  for (int i = 0; i < kTiles; ++i) c[i][0] = c[i][1] = c[i][2] = c[i][3] = 0.0f;
}

// ---- forward ------------------------------------------------------------------------------------

template <int kD>
__global__ void __launch_bounds__(kFlashThreads) flash_fwd_kernel(FlashArgs a) {
  constexpr Tile kTile = fwd_tile(kD);
  constexpr int kBq = kTile.block_q, kBkv = kTile.block_kv, ld = kD + kSmemPad;
  constexpr int kKs = kD / 16, kNs = kBkv / 8, kDs = kD / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16_t* sq = reinterpret_cast<bf16_t*>(smem_raw);
  bf16_t* sk = sq + kBq * ld;
  bf16_t* sv = sk + kBkv * ld;

  const int64_t b = blockIdx.z, h = blockIdx.y;
  const Seq seq = sequence(a, b);
  const int64_t q0 = tile_of_block(blockIdx.x, gridDim.x) * kBq;
  if (q0 >= seq.len) return;
  const int64_t hk = h / (a.H / a.Hkv);
  const int warp = threadIdx.x / 32, wr = warp * kRowsPerWarp;
  const auto* q = static_cast<const bf16_t*>(a.q);
  const auto* k = static_cast<const bf16_t*>(a.k);
  const auto* v = static_cast<const bf16_t*>(a.v);

  stage<kBq, kD>(sq, q, a.H, h, seq, q0);
  __syncthreads();
  uint32_t qf[kKs][4];
#pragma unroll
  for (int ks = 0; ks < kKs; ++ks) load_a(qf[ks], sq, ld, wr, ks * 16);

  const float scale2 = a.scale * kLog2e;
  float o[kDs][4];
  zero(o);
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  const TileRange kt = key_tiles(q0, kBq, kBkv, seq.len, a.window);
  for (int64_t j = kt.first; j < kt.last; ++j) {
    const int64_t k0 = j * kBkv;
    __syncthreads();  // the previous tile's readers are done
    stage<kBkv, kD>(sk, k, a.Hkv, hk, seq, k0);
    stage<kBkv, kD>(sv, v, a.Hkv, hk, seq, k0);
    __syncthreads();
    float s[kNs][4];
    zero(s);
#pragma unroll
    for (int ks = 0; ks < kKs; ++ks)
#pragma unroll
      for (int nt = 0; nt < kNs; ++nt) {
        uint32_t bk[2];
        load_b_rows_n(bk, sk, ld, nt * 8, ks * 16);
        mma(s[nt], qf[ks], bk);
      }
    float mx[2] = {m[0], m[1]};
#pragma unroll
    for (int nt = 0; nt < kNs; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t i = q0 + wr + acc_row(e), kj = k0 + acc_col(nt, e);
        s[nt][e] = visible(i, kj, seq.len, a.window) ? s[nt][e] * scale2 : -INFINITY;
        mx[e / 2] = fmaxf(mx[e / 2], s[nt][e]);
      }
    float alpha[2], base[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      // A row with nothing visible yet keeps m = -inf; exp2 against 0 then gives exact zeros.
      base[r] = mx[r] == -INFINITY ? 0.0f : mx[r];
      alpha[r] = exp2f(m[r] - base[r]);
      m[r] = mx[r];
      l[r] *= alpha[r];
    }
#pragma unroll
    for (int nt = 0; nt < kNs; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[nt][e] = exp2f(s[nt][e] - base[e / 2]);
        l[e / 2] += s[nt][e];
      }
#pragma unroll
    for (int dt = 0; dt < kDs; ++dt) {
      o[dt][0] *= alpha[0];
      o[dt][1] *= alpha[0];
      o[dt][2] *= alpha[1];
      o[dt][3] *= alpha[1];
    }
#pragma unroll
    for (int kj = 0; kj < kBkv / 16; ++kj) {
      uint32_t pa[4];
      acc_to_a(pa, s, kj);
#pragma unroll
      for (int dt = 0; dt < kDs; ++dt) {
        uint32_t bv[2];
        load_b_rows_k(bv, sv, ld, kj * 16, dt * 8);
        mma(o[dt], pa, bv);
      }
    }
  }
  // Each of the 4 threads of a row summed its own columns.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
  }
  store_rows<kD>(static_cast<bf16_t*>(a.out), a.H, h, seq, q0 + wr, o, 1.0f / l[0], 1.0f / l[1]);
  if (threadIdx.x % 4 == 0)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t i = q0 + wr + acc_row(2 * r);
      if (i < seq.len) a.lse[lse_index(a, b, seq, h, i)] = (m[r] + log2f(l[r])) * kLn2;
    }
}

// ---- backward: dq -------------------------------------------------------------------------------

template <int kD>
__global__ void __launch_bounds__(kFlashThreads) flash_dq_kernel(FlashArgs a) {
  constexpr Tile kTile = dq_tile(kD);
  constexpr int kBq = kTile.block_q, kBkv = kTile.block_kv, ld = kD + kSmemPad;
  constexpr int kKs = kD / 16, kNs = kBkv / 8, kDs = kD / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16_t* sq = reinterpret_cast<bf16_t*>(smem_raw);
  bf16_t* sdo = sq + kBq * ld;
  bf16_t* sk = sdo + kBq * ld;
  bf16_t* sv = sk + kBkv * ld;

  const int64_t b = blockIdx.z, h = blockIdx.y;
  const Seq seq = sequence(a, b);
  const int64_t q0 = tile_of_block(blockIdx.x, gridDim.x) * kBq;
  if (q0 >= seq.len) return;
  const int64_t hk = h / (a.H / a.Hkv);
  const int warp = threadIdx.x / 32, wr = warp * kRowsPerWarp;

  stage<kBq, kD>(sq, static_cast<const bf16_t*>(a.q), a.H, h, seq, q0);
  stage<kBq, kD>(sdo, static_cast<const bf16_t*>(a.dout), a.H, h, seq, q0);
  __syncthreads();
  uint32_t qf[kKs][4], dof[kKs][4];
#pragma unroll
  for (int ks = 0; ks < kKs; ++ks) {
    load_a(qf[ks], sq, ld, wr, ks * 16);
    load_a(dof[ks], sdo, ld, wr, ks * 16);
  }
  float lse2[2], delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t i = q0 + wr + acc_row(2 * r);
    const bool real = i < seq.len;
    lse2[r] = real ? a.lse[lse_index(a, b, seq, h, i)] * kLog2e : 0.0f;
    delta[r] = real ? a.delta[lse_index(a, b, seq, h, i)] : 0.0f;
  }

  const float scale2 = a.scale * kLog2e;
  float dq[kDs][4];
  zero(dq);
  const TileRange kt = key_tiles(q0, kBq, kBkv, seq.len, a.window);
  for (int64_t j = kt.first; j < kt.last; ++j) {
    const int64_t k0 = j * kBkv;
    __syncthreads();
    stage<kBkv, kD>(sk, static_cast<const bf16_t*>(a.k), a.Hkv, hk, seq, k0);
    stage<kBkv, kD>(sv, static_cast<const bf16_t*>(a.v), a.Hkv, hk, seq, k0);
    __syncthreads();
    float s[kNs][4], dp[kNs][4];
    zero(s);
    zero(dp);
#pragma unroll
    for (int ks = 0; ks < kKs; ++ks)
#pragma unroll
      for (int nt = 0; nt < kNs; ++nt) {
        uint32_t bk[2], bv[2];
        load_b_rows_n(bk, sk, ld, nt * 8, ks * 16);
        load_b_rows_n(bv, sv, ld, nt * 8, ks * 16);
        mma(s[nt], qf[ks], bk);
        mma(dp[nt], dof[ks], bv);
      }
    // s becomes dS = P (dP - delta).
#pragma unroll
    for (int nt = 0; nt < kNs; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t i = q0 + wr + acc_row(e), kj = k0 + acc_col(nt, e);
        const float p = visible(i, kj, seq.len, a.window) ? exp2f(s[nt][e] * scale2 - lse2[e / 2]) : 0.0f;
        s[nt][e] = p * (dp[nt][e] - delta[e / 2]);
      }
#pragma unroll
    for (int kj = 0; kj < kBkv / 16; ++kj) {
      uint32_t da[4];
      acc_to_a(da, s, kj);
#pragma unroll
      for (int dt = 0; dt < kDs; ++dt) {
        uint32_t bk[2];
        load_b_rows_k(bk, sk, ld, kj * 16, dt * 8);
        mma(dq[dt], da, bk);
      }
    }
  }
  store_rows<kD>(static_cast<bf16_t*>(a.dq), a.H, h, seq, q0 + wr, dq, a.scale, a.scale);
}

// ---- backward: dk, dv ---------------------------------------------------------------------------

template <int kD>
__global__ void __launch_bounds__(kFlashThreads) flash_dkv_kernel(FlashArgs a) {
  constexpr Tile kTile = dkv_tile(kD);
  constexpr int kBq = kTile.block_q, kBkv = kTile.block_kv, ld = kD + kSmemPad;
  constexpr int kKs = kD / 16, kNs = kBq / 8, kDs = kD / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16_t* sk = reinterpret_cast<bf16_t*>(smem_raw);
  bf16_t* sv = sk + kBkv * ld;
  bf16_t* sq = sv + kBkv * ld;
  bf16_t* sdo = sq + kBq * ld;
  float* slse2 = reinterpret_cast<float*>(sdo + kBq * ld);
  float* sdelta = slse2 + kBq;

  const int64_t b = blockIdx.z, hk = blockIdx.y;
  const Seq seq = sequence(a, b);
  const int64_t k0 = tile_of_block(blockIdx.x, gridDim.x) * kBkv;
  if (k0 >= seq.len) return;
  const int64_t group = a.H / a.Hkv;
  const int warp = threadIdx.x / 32, wr = warp * kRowsPerWarp;

  stage<kBkv, kD>(sk, static_cast<const bf16_t*>(a.k), a.Hkv, hk, seq, k0);
  stage<kBkv, kD>(sv, static_cast<const bf16_t*>(a.v), a.Hkv, hk, seq, k0);

  const float scale2 = a.scale * kLog2e;
  float dk[kDs][4], dv[kDs][4];
  zero(dk);
  zero(dv);
  const TileRange qt = query_tiles(k0, kBq, kBkv, seq.len, a.window);
  for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
    for (int64_t it = qt.first; it < qt.last; ++it) {
      const int64_t q0 = it * kBq;
      __syncthreads();
      stage<kBq, kD>(sq, static_cast<const bf16_t*>(a.q), a.H, h, seq, q0);
      stage<kBq, kD>(sdo, static_cast<const bf16_t*>(a.dout), a.H, h, seq, q0);
      for (int r = threadIdx.x; r < kBq; r += kFlashThreads) {
        const bool real = q0 + r < seq.len;
        slse2[r] = real ? a.lse[lse_index(a, b, seq, h, q0 + r)] * kLog2e : 0.0f;
        sdelta[r] = real ? a.delta[lse_index(a, b, seq, h, q0 + r)] : 0.0f;
      }
      __syncthreads();
      // Transposed scores: rows are this warp's keys, columns the tile's queries.
      float st[kNs][4], dpt[kNs][4];
      zero(st);
      zero(dpt);
#pragma unroll
      for (int ks = 0; ks < kKs; ++ks) {
        uint32_t ka[4], va[4];
        load_a(ka, sk, ld, wr, ks * 16);
        load_a(va, sv, ld, wr, ks * 16);
#pragma unroll
        for (int nt = 0; nt < kNs; ++nt) {
          uint32_t bq[2], bdo[2];
          load_b_rows_n(bq, sq, ld, nt * 8, ks * 16);
          load_b_rows_n(bdo, sdo, ld, nt * 8, ks * 16);
          mma(st[nt], ka, bq);
          mma(dpt[nt], va, bdo);
        }
      }
      // st becomes Pᵀ, dpt becomes dSᵀ.
#pragma unroll
      for (int nt = 0; nt < kNs; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int c = acc_col(nt, e);
          const int64_t kj = k0 + wr + acc_row(e), i = q0 + c;
          const float p = visible(i, kj, seq.len, a.window) ? exp2f(st[nt][e] * scale2 - slse2[c]) : 0.0f;
          st[nt][e] = p;
          dpt[nt][e] = p * (dpt[nt][e] - sdelta[c]);
        }
#pragma unroll
      for (int qj = 0; qj < kBq / 16; ++qj) {
        uint32_t pa[4], dsa[4];
        acc_to_a(pa, st, qj);
        acc_to_a(dsa, dpt, qj);
#pragma unroll
        for (int dt = 0; dt < kDs; ++dt) {
          uint32_t bdo[2], bq[2];
          load_b_rows_k(bdo, sdo, ld, qj * 16, dt * 8);
          load_b_rows_k(bq, sq, ld, qj * 16, dt * 8);
          mma(dv[dt], pa, bdo);
          mma(dk[dt], dsa, bq);
        }
      }
    }
  }
  store_rows<kD>(static_cast<bf16_t*>(a.dk), a.Hkv, hk, seq, k0 + wr, dk, a.scale, a.scale);
  store_rows<kD>(static_cast<bf16_t*>(a.dv), a.Hkv, hk, seq, k0 + wr, dv, 1.0f, 1.0f);
}

// Launchers of one head dim, instantiated in flash_attention_hd*.cu. A kernel above 48 KiB of
// dynamic shared memory must opt in first (the plan checked the device's limit).
template <class Kernel>
cudaError_t launch_kernel(Kernel kernel, const KernelPlan& k, const FlashArgs& a, cudaStream_t s) {
  if (k.smem_bytes > 48 * 1024) {
    const cudaError_t e =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(k.smem_bytes));
    if (e != cudaSuccess) return e;
  }
  const dim3 grid(static_cast<unsigned>(k.grid.x), static_cast<unsigned>(k.grid.y), static_cast<unsigned>(k.grid.z));
  kernel<<<grid, kFlashThreads, static_cast<size_t>(k.smem_bytes), s>>>(a);
  return cudaGetLastError();
}

template <int kD>
cudaError_t run_flash_fwd(const FlashArgs& a, const Plan& plan, cudaStream_t s) {
  return launch_kernel(flash_fwd_kernel<kD>, plan.fwd, a, s);
}

template <int kD>
cudaError_t run_flash_bwd(const FlashArgs& a, const Plan& plan, cudaStream_t s) {
  const cudaError_t e = launch_kernel(flash_dq_kernel<kD>, plan.dq, a, s);
  if (e != cudaSuccess) return e;
  return launch_kernel(flash_dkv_kernel<kD>, plan.dkv, a, s);
}

}  // namespace moeforge::cuda::flash
