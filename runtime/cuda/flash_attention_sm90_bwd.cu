// The Hopper (sm_90a) fused attention backward: the FlashAttention-2 backward of
// flash_attention.cuh (the same split into a dq kernel and a dk/dv kernel, so no atomics and
// bitwise-deterministic results; the same masks, packed sequences and GQA) with the streamed tiles
// brought in by TMA through a 2-stage ring and every product on wgmma. Block layout, shared-memory
// layout and planning: attention_plan_sm90.h ("backward"); PTX primitives and the
// descriptor/swizzle reasoning: flash_attention_sm90.cuh. With P = exp(S scale - lse) and
// delta_i = <dO_i, O_i> (the pre-pass below):
//   dq kernel (a block per 128 queries and head, keys streamed in tiles of 64):
//     S = Q Kᵀ, dP = dO Vᵀ, dS = P (dP - delta), dQ = scale sum_j dS K_j;
//   dkv kernel (a block per 128 keys and kv head; the query tiles of each head of the group
//     streamed in tiles of 64): Sᵀ = K Qᵀ, dPᵀ = V dOᵀ, dV = sum_i Pᵀ dO_i,
//     dK = scale sum_i dSᵀ Q_i.
// The products: the S-like ones read both operands from shared memory (K-major); the accumulations take
// dS / Pᵀ / dSᵀ from registers (re-packed accumulators) and the streamed tile as an MN-major B.
#include <cuda.h>
#include <cudaTypedefs.h>

#include "runtime/cuda/attention_plan_sm90.h"
#include "runtime/cuda/flash_attention.cuh"
#include "runtime/cuda/flash_attention_sm90.cuh"
#include "runtime/cuda/launchers.h"

namespace moeforge::cuda::flash::sm90 {

namespace {

// One warp per (row, head) of the packed rows: delta in lse's layout, fp32 from bf16 (as the
// mma.sync backward's pre-pass).
constexpr int kDeltaWarps = 4;
__global__ void flash_delta_sm90_kernel(FlashArgs a) {
  const int64_t w = (blockIdx.x * int64_t{blockDim.x} + threadIdx.x) / 32;
  if (w >= a.total_rows * a.H) return;
  const int64_t r = w / a.H, h = w % a.H;
  const auto* o = static_cast<const bf16_t*>(a.out) + w * a.D;
  const auto* d = static_cast<const bf16_t*>(a.dout) + w * a.D;
  float acc = 0.0f;
  for (int64_t c = threadIdx.x % 32; c < a.D; c += 32) acc += __bfloat162float(o[c]) * __bfloat162float(d[c]);
  for (int off = 16; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (threadIdx.x % 32 != 0) return;
  const int64_t index = a.cu_seqlens == nullptr ? (r / a.T * a.H + h) * a.T + r % a.T : h * a.total_rows + r;
  a.delta[index] = acc;
}

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)

// The shared-memory base (aligned to the swizzle atom) and the barrier addresses.
struct Smem {
  uint32_t base, res_full;
  __device__ uint32_t full(int s) const { return res_full + 8u * (1 + s); }
  __device__ uint32_t empty(int s) const { return res_full + 8u * (1 + kStages + s); }
};

template <int kD>
__device__ __forceinline__ Smem smem_setup() {
  extern __shared__ unsigned char smem_raw[];
  const uint32_t base = (smem_addr(smem_raw) + kSwizzleAtomBytes - 1) & ~uint32_t{kSwizzleAtomBytes - 1};
  return {base, base + static_cast<uint32_t>(bwd_layout(kD).barriers)};
}

__device__ __forceinline__ void init_barriers(const Smem& m, const CUtensorMap* maps[4]) {
  if (threadIdx.x == 0) {
    for (int i = 0; i < 4; ++i) tma_prefetch_map(maps[i]);
    mbar_init(m.res_full, 1);
    for (int s = 0; s < kStages; ++s) {
      mbar_init(m.full(s), 1);
      mbar_init(m.empty(s), kConsumerThreads);
    }
    mbar_init_fence();
  }
  __syncthreads();
}

// The producer thread's resident load: tiles 0 and 1 from maps r0 and r1 at (head, row).
template <int kD>
__device__ __forceinline__ void load_resident(const Smem& m, const CUtensorMap* r0, const CUtensorMap* r1, int64_t head,
                                              int64_t row) {
  mbar_arrive_expect_tx(m.res_full, bwd_resident_bytes(kD));
  for (int c = 0; c < kD / kChunkCols; ++c) {
    tma_load_3d(m.base + static_cast<uint32_t>(resident_chunk_at(kD, 0, c)), r0, m.res_full, c * kChunkCols,
                static_cast<int32_t>(head), static_cast<int32_t>(row));
    tma_load_3d(m.base + static_cast<uint32_t>(resident_chunk_at(kD, 1, c)), r1, m.res_full, c * kChunkCols,
                static_cast<int32_t>(head), static_cast<int32_t>(row));
  }
}

// The producer thread's load of step `it` into stage it % kStages once the consumers freed it.
template <int kD>
__device__ __forceinline__ void load_ring(const Smem& m, int64_t it, const CUtensorMap* x0, const CUtensorMap* x1,
                                          int64_t head, int64_t row) {
  const int s = static_cast<int>(it % kStages);
  mbar_wait(m.empty(s), static_cast<uint32_t>((it / kStages) & 1) ^ 1u);
  mbar_arrive_expect_tx(m.full(s), bwd_stage_bytes(kD));
  for (int c = 0; c < kD / kChunkCols; ++c) {
    tma_load_3d(m.base + static_cast<uint32_t>(ring_chunk_at(kD, 0, s, c)), x0, m.full(s), c * kChunkCols,
                static_cast<int32_t>(head), static_cast<int32_t>(row));
    tma_load_3d(m.base + static_cast<uint32_t>(ring_chunk_at(kD, 1, s, c)), x1, m.full(s), c * kChunkCols,
                static_cast<int32_t>(head), static_cast<int32_t>(row));
  }
}

// Warpgroup cw's two shared x shared products of stage s: c0 = R0 X0ᵀ and c1 = R1 X1ᵀ (64 x 64).
template <int kD>
__device__ __forceinline__ void two_products(const Smem& m, int cw, int s, float (&c0)[8][4], float (&c1)[8][4]) {
  wgmma_fence();
#pragma unroll
  for (int ks = 0; ks < kD / 16; ++ks)
    wgmma_ss<kBwdRingRows>(
        c0, desc_sw128(m.base + static_cast<uint32_t>(resident_operand_at(kD, 0, cw, ks)), 16, kSwizzleAtomBytes),
        desc_sw128(m.base + static_cast<uint32_t>(ring_operand_at(kD, 0, s, ks)), 16, kSwizzleAtomBytes), ks > 0);
#pragma unroll
  for (int ks = 0; ks < kD / 16; ++ks)
    wgmma_ss<kBwdRingRows>(
        c1, desc_sw128(m.base + static_cast<uint32_t>(resident_operand_at(kD, 1, cw, ks)), 16, kSwizzleAtomBytes),
        desc_sw128(m.base + static_cast<uint32_t>(ring_operand_at(kD, 1, s, ks)), 16, kSwizzleAtomBytes), ks > 0);
  wgmma_commit();
  wgmma_wait_all();
  fence_operand(c0);
  fence_operand(c1);
}

// acc (64 x kD) += A (64 x 64, registers, k-steps of 16) x ring tile x of stage s (MN-major B).
template <int kD>
__device__ __forceinline__ void accumulate(const Smem& m, int x, int s, float (&acc)[kD / 8][4],
                                           const uint32_t (&a)[kBwdRingRows / 16][4]) {
#pragma unroll
  for (int kj = 0; kj < kBwdRingRows / 16; ++kj)
#pragma unroll
    for (int c = 0; c < kD / kChunkCols; ++c)
      wgmma_rs_n64(tiles_at<64>(acc, c * 8), a[kj],
                   desc_sw128(m.base + static_cast<uint32_t>(ring_mn_operand_at(kD, x, s, kj, c)),
                              static_cast<uint32_t>(bwd_layout(kD).ring_chunk), kSwizzleAtomBytes));
}

#endif  // sm_90a

// ---- dq ------------------------------------------------------------------------------------------

template <int kD>
__global__ void __launch_bounds__(kThreads, 1)
    flash_dq_sm90_kernel(const __grid_constant__ CUtensorMap tq, const __grid_constant__ CUtensorMap tdo,
                         const __grid_constant__ CUtensorMap tk, const __grid_constant__ CUtensorMap tv,
                         const FlashArgs a) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int kBr = kBwdResidentRows, kBc = kBwdRingRows, kNs = kBc / 8, kDs = kD / 8;
  const Smem m = smem_setup<kD>();
  const int64_t b = blockIdx.z, h = blockIdx.y;
  const Seq seq = sequence(a, b);
  const int64_t q0 = tile_of_block(blockIdx.x, gridDim.x) * kBr;
  if (q0 >= seq.len) return;
  const int64_t hk = h / (a.H / a.Hkv);
  const TileRange kt = key_tiles(q0, kBr, kBc, seq.len, a.window);
  const int64_t n_steps = kt.last - kt.first;
  const CUtensorMap* maps[4] = {&tq, &tdo, &tk, &tv};
  init_barriers(m, maps);

  const int wg = threadIdx.x / kWarpgroupThreads;
  if (wg == 0) {
    regs_dec<kProducerRegs>();
    if (threadIdx.x != 0) return;
    load_resident<kD>(m, &tq, &tdo, h, seq.start + q0);
    for (int64_t it = 0; it < n_steps; ++it) load_ring<kD>(m, it, &tk, &tv, hk, seq.start + (kt.first + it) * kBc);
    return;
  }

  regs_inc<kConsumerRegs>();
  const int cw = wg - 1;
  const int64_t q_lo = q0 + cw * kRowsPerWarpgroup;
  const int64_t wr = q_lo + (threadIdx.x % kWarpgroupThreads) / 32 * kRowsPerWarp;
  const float scale2 = a.scale * kLog2e;
  float lse2[2], delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t i = wr + acc_row(2 * r);
    const bool real = i < seq.len;
    lse2[r] = real ? a.lse[lse_index(a, b, seq, h, i)] * kLog2e : 0.0f;
    delta[r] = real ? a.delta[lse_index(a, b, seq, h, i)] : 0.0f;
  }
  float dq[kDs][4];
  zero(dq);
  mbar_wait(m.res_full, 0);
  for (int64_t it = 0; it < n_steps; ++it) {
    const int s = static_cast<int>(it % kStages);
    const int64_t k0 = (kt.first + it) * kBc;
    mbar_wait(m.full(s), static_cast<uint32_t>((it / kStages) & 1));
    if (tile_visible_any(q_lo, kRowsPerWarpgroup, k0, kBc, seq.len, a.window)) {
      float sc[kNs][4], dp[kNs][4];
      two_products<kD>(m, cw, s, sc, dp);  // S = Q Kᵀ, dP = dO Vᵀ
      const bool mask = tile_needs_mask(q_lo, kRowsPerWarpgroup, k0, kBc, seq.len, a.window);
#pragma unroll
      for (int nt = 0; nt < kNs; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const bool vis = !mask || visible(wr + acc_row(e), k0 + acc_col(nt, e), seq.len, a.window);
          const float p = vis ? exp2f(sc[nt][e] * scale2 - lse2[e / 2]) : 0.0f;
          sc[nt][e] = p * (dp[nt][e] - delta[e / 2]);  // dS
        }
      uint32_t dsa[kBc / 16][4];
#pragma unroll
      for (int kj = 0; kj < kBc / 16; ++kj) acc_to_a(dsa[kj], sc, kj);
      fence_operand(dq);
      fence_operand(dsa);
      wgmma_fence();
      accumulate<kD>(m, 0, s, dq, dsa);  // dQ += dS K
      wgmma_commit();
      wgmma_wait_all();
      fence_operand(dq);
      fence_operand(dsa);
    }
    mbar_arrive(m.empty(s));
  }
  store_rows<kD>(static_cast<bf16_t*>(a.dq), a.H, h, seq, wr, dq, a.scale, a.scale);
#elif defined(__CUDA_ARCH__)
  __trap();  // another architecture: the dispatcher never launches this kernel there
#endif
}

// ---- dk, dv --------------------------------------------------------------------------------------

template <int kD>
__global__ void __launch_bounds__(kThreads, 1)
    flash_dkv_sm90_kernel(const __grid_constant__ CUtensorMap tk, const __grid_constant__ CUtensorMap tv,
                          const __grid_constant__ CUtensorMap tq, const __grid_constant__ CUtensorMap tdo,
                          const FlashArgs a) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int kBr = kBwdResidentRows, kBc = kBwdRingRows, kNs = kBc / 8, kDs = kD / 8;
  const Smem m = smem_setup<kD>();
  const int64_t b = blockIdx.z, hk = blockIdx.y;
  const Seq seq = sequence(a, b);
  const int64_t k0 = tile_of_block(blockIdx.x, gridDim.x) * kBr;
  if (k0 >= seq.len) return;
  const int64_t group = a.H / a.Hkv;
  const TileRange qt = query_tiles(k0, kBc, kBr, seq.len, a.window);
  const int64_t per_head = qt.last - qt.first, n_steps = group * per_head;
  const CUtensorMap* maps[4] = {&tk, &tv, &tq, &tdo};
  init_barriers(m, maps);

  // Step it: query head hk * group + it / per_head, query tile qt.first + it % per_head.
  const int wg = threadIdx.x / kWarpgroupThreads;
  if (wg == 0) {
    regs_dec<kProducerRegs>();
    if (threadIdx.x != 0) return;
    load_resident<kD>(m, &tk, &tv, hk, seq.start + k0);
    for (int64_t it = 0; it < n_steps; ++it)
      load_ring<kD>(m, it, &tq, &tdo, hk * group + it / per_head, seq.start + (qt.first + it % per_head) * kBc);
    return;
  }

  regs_inc<kConsumerRegs>();
  const int cw = wg - 1;
  const int64_t k_lo = k0 + cw * kRowsPerWarpgroup;
  const int64_t wr = k_lo + (threadIdx.x % kWarpgroupThreads) / 32 * kRowsPerWarp;  // this warp's first key
  const float scale2 = a.scale * kLog2e;
  float dk[kDs][4], dv[kDs][4];
  zero(dk);
  zero(dv);
  mbar_wait(m.res_full, 0);
  for (int64_t it = 0; it < n_steps; ++it) {
    const int s = static_cast<int>(it % kStages);
    const int64_t h = hk * group + it / per_head, q0 = (qt.first + it % per_head) * kBc;
    mbar_wait(m.full(s), static_cast<uint32_t>((it / kStages) & 1));
    if (tile_visible_any(q0, kBc, k_lo, kRowsPerWarpgroup, seq.len, a.window)) {
      float st[kNs][4], dpt[kNs][4];
      two_products<kD>(m, cw, s, st, dpt);  // Sᵀ = K Qᵀ, dPᵀ = V dOᵀ
      const bool mask = dkv_tile_needs_mask(q0, kBc, k_lo, kRowsPerWarpgroup, seq.len, a.window);
#pragma unroll
      for (int nt = 0; nt < kNs; ++nt)
#pragma unroll
        for (int col = 0; col < 2; ++col) {
          const int64_t i = q0 + acc_col(nt, col);  // this pair of elements' query
          const bool real = i < seq.len;
          const float l2 = real ? a.lse[lse_index(a, b, seq, h, i)] * kLog2e : 0.0f;
          const float di = real ? a.delta[lse_index(a, b, seq, h, i)] : 0.0f;
#pragma unroll
          for (int e = col; e < 4; e += 2) {
            const bool vis = !mask || visible(i, wr + acc_row(e), seq.len, a.window);
            const float p = vis ? exp2f(st[nt][e] * scale2 - l2) : 0.0f;
            st[nt][e] = p;                       // Pᵀ
            dpt[nt][e] = p * (dpt[nt][e] - di);  // dSᵀ
          }
        }
      uint32_t pa[kBc / 16][4], dsa[kBc / 16][4];
#pragma unroll
      for (int kj = 0; kj < kBc / 16; ++kj) {
        acc_to_a(pa[kj], st, kj);
        acc_to_a(dsa[kj], dpt, kj);
      }
      fence_operand(dv);
      fence_operand(dk);
      fence_operand(pa);
      fence_operand(dsa);
      wgmma_fence();
      accumulate<kD>(m, 1, s, dv, pa);   // dV += Pᵀ dO
      accumulate<kD>(m, 0, s, dk, dsa);  // dK += dSᵀ Q
      wgmma_commit();
      wgmma_wait_all();
      fence_operand(dv);
      fence_operand(dk);
      fence_operand(pa);
      fence_operand(dsa);
    }
    mbar_arrive(m.empty(s));
  }
  store_rows<kD>(static_cast<bf16_t*>(a.dk), a.Hkv, hk, seq, wr, dk, a.scale, a.scale);
  store_rows<kD>(static_cast<bf16_t*>(a.dv), a.Hkv, hk, seq, wr, dv, 1.0f, 1.0f);
#elif defined(__CUDA_ARCH__)
  __trap();
#endif
}

template <class Kernel>
cudaError_t launch_bwd_kernel(Kernel kernel, const Grid& g, int64_t smem, const CUtensorMap& m0, const CUtensorMap& m1,
                              const CUtensorMap& m2, const CUtensorMap& m3, const FlashArgs& a, cudaStream_t s) {
  const cudaError_t e =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (e != cudaSuccess) return e;
  const dim3 grid(static_cast<unsigned>(g.x), static_cast<unsigned>(g.y), static_cast<unsigned>(g.z));
  kernel<<<grid, kThreads, static_cast<size_t>(smem), s>>>(m0, m1, m2, m3, a);
  return cudaGetLastError();
}

template <int kD>
cudaError_t run_bwd(const FlashArgs& a, const Sm90BwdPlan& plan, cudaStream_t s) {
  CUtensorMap q_res{}, dout_res{}, k_ring{}, v_ring{}, k_res{}, v_res{}, q_ring{}, dout_ring{};
  cudaError_t e = encode_tensor_map(&q_res, a.q, plan.q_res);
  if (e == cudaSuccess) e = encode_tensor_map(&dout_res, a.dout, plan.dout_res);
  if (e == cudaSuccess) e = encode_tensor_map(&k_ring, a.k, plan.k_ring);
  if (e == cudaSuccess) e = encode_tensor_map(&v_ring, a.v, plan.v_ring);
  if (e == cudaSuccess) e = encode_tensor_map(&k_res, a.k, plan.k_res);
  if (e == cudaSuccess) e = encode_tensor_map(&v_res, a.v, plan.v_res);
  if (e == cudaSuccess) e = encode_tensor_map(&q_ring, a.q, plan.q_ring);
  if (e == cudaSuccess) e = encode_tensor_map(&dout_ring, a.dout, plan.dout_ring);
  if (e != cudaSuccess) return e;
  const int64_t warps = a.total_rows * a.H;
  if (warps > 0) {
    flash_delta_sm90_kernel<<<static_cast<unsigned>((warps + kDeltaWarps - 1) / kDeltaWarps), kDeltaWarps * 32, 0, s>>>(
        a);
    e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  }
  e = launch_bwd_kernel(flash_dq_sm90_kernel<kD>, plan.dq_grid, plan.smem_bytes, q_res, dout_res, k_ring, v_ring, a, s);
  if (e != cudaSuccess) return e;
  return launch_bwd_kernel(flash_dkv_sm90_kernel<kD>, plan.dkv_grid, plan.smem_bytes, k_res, v_res, q_ring, dout_ring,
                           a, s);
}

}  // namespace
}  // namespace moeforge::cuda::flash::sm90

namespace moeforge::cuda::launch {

cudaError_t flash_attention_bwd_sm90(const flash::FlashArgs& args, const flash::sm90::Sm90BwdPlan& plan,
                                     cudaStream_t s) {
  return args.D == 64 ? flash::sm90::run_bwd<64>(args, plan, s) : flash::sm90::run_bwd<128>(args, plan, s);
}

}  // namespace moeforge::cuda::launch
