// The Hopper (sm_90a) fused attention forward: the FlashAttention-2 forward of
// flash_attention.cuh (same masks, packed sequences, GQA and lse layout) with the K and V tiles
// brought in by TMA through a 2-stage shared-memory ring and the two products on wgmma:
//   S = Q Kᵀ:  A = Q (shared, K-major), B = K (shared, K-major), D = S in registers;
//   O += P V:  A = P (registers, S re-packed as bf16), B = V (shared, MN-major), D = O in registers.
// Block layout, shared-memory layout and planning: attention_plan_sm90.h; PTX primitives and the
// descriptor/swizzle reasoning: flash_attention_sm90.cuh. Compiled for sm_90a only
// (runtime/CMakeLists.txt) and run only on compute capability 9.0 (ops_flash_attention.cpp). The
// backward is flash_attention_sm90_bwd.cu (or, forced with MOEFORGE_ATTENTION_KERNEL=mma, the
// mma.sync one): both read the lse this writes.
//
// Schedule. The producer thread loads the block's Q tile once, then walks the visible key tiles:
// for tile it, stage s = it % 2 is reused after both consumer warpgroups released it (empty[s],
// 256 arrivals) and is full once the K and V bytes landed (full[s], one arrival + transaction
// bytes). Each consumer warpgroup, per key tile: waits full[s]; S = Q Kᵀ (D/16 wgmma k-steps,
// N = 128); masks (only tiles that cross the diagonal, the window edge or the sequence end) and
// runs the online softmax in registers exactly as the mma.sync kernel does (log2 domain); issues
// O += P V (128/16 k-steps x D/64 wgmma of N = 64); waits for it and releases the stage. The
// copy of tile it + 1 overlaps the math of tile it; the softmax does not overlap the tensor cores
// (FA3's intra-warpgroup pipelining and ping-pong scheduling are not done here).
#include <cuda.h>
#include <cudaTypedefs.h>

#include "runtime/cuda/attention_plan_sm90.h"
#include "runtime/cuda/flash_attention.cuh"
#include "runtime/cuda/flash_attention_sm90.cuh"
#include "runtime/cuda/launchers.h"

namespace moeforge::cuda::flash::sm90 {

// cuTensorMapEncodeTiled from the driver, through the runtime (the program does not link
// libcuda). Looked up once; the pointer never changes afterwards.
static PFN_cuTensorMapEncodeTiled_v12000 encode_tiled() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &found) !=
            cudaSuccess ||
        found != cudaDriverEntryPointSuccess)
      p = nullptr;
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p);
  }();
  return fn;
}

// The bf16 tensor map of `t` (TensorBox: 3-D {D, heads, rows}, box {64, 1, rows}), 128-byte
// swizzle to match the wgmma descriptors, zeros out of bounds.
cudaError_t encode_tensor_map(CUtensorMap* map, const void* data, const TensorBox& t) {
  const PFN_cuTensorMapEncodeTiled_v12000 fn = encode_tiled();
  if (fn == nullptr) return cudaErrorNotSupported;
  const cuuint64_t dims[3] = {t.dims[0], t.dims[1], t.dims[2]};
  const cuuint64_t strides[2] = {t.strides[0], t.strides[1]};
  const cuuint32_t box[3] = {t.box[0], t.box[1], t.box[2]};
  const cuuint32_t elem_strides[3] = {1, 1, 1};
  const CUresult r = fn(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 3, const_cast<void*>(data), dims, strides, box,
                        elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                        CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

namespace {

template <int kD>
__global__ void __launch_bounds__(kThreads, 1)
    flash_fwd_sm90_kernel(const __grid_constant__ CUtensorMap tq, const __grid_constant__ CUtensorMap tk,
                          const __grid_constant__ CUtensorMap tv, const FlashArgs a) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr Tile kTile = fwd_tile(kD);
  constexpr int kBq = kTile.block_q, kBkv = kTile.block_kv;
  constexpr int kChunks = kD / kChunkCols, kKs = kD / 16, kNs = kBkv / 8, kDs = kD / 8;
  constexpr SmemLayout kL = smem_layout(kD);
  static_assert(kL.q_chunk % kSwizzleAtomBytes == 0 && kL.kv_chunk % kSwizzleAtomBytes == 0,
                "every chunk must start on a swizzle atom");
  static_assert(kBkv == 64 || kBkv == 128, "S = Q K^T is one wgmma of N = block_kv");

  extern __shared__ unsigned char smem_raw[];
  const uint32_t base = (smem_addr(smem_raw) + kSwizzleAtomBytes - 1) & ~uint32_t{kSwizzleAtomBytes - 1};
  const uint32_t q_full = base + static_cast<uint32_t>(kL.barriers);
  const auto full = [&](int s) { return q_full + 8u * (1 + s); };
  const auto empty = [&](int s) { return q_full + 8u * (1 + kStages + s); };

  const int64_t b = blockIdx.z, h = blockIdx.y;
  const Seq seq = sequence(a, b);
  const int64_t q0 = tile_of_block(blockIdx.x, gridDim.x) * kBq;
  if (q0 >= seq.len) return;  // uniform over the block, before any barrier
  const int64_t hk = h / (a.H / a.Hkv);
  const TileRange kt = key_tiles(q0, kBq, kBkv, seq.len, a.window);
  const int64_t n_tiles = kt.last - kt.first;

  if (threadIdx.x == 0) {
    tma_prefetch_map(&tq);
    tma_prefetch_map(&tk);
    tma_prefetch_map(&tv);
    mbar_init(q_full, 1);
    for (int s = 0; s < kStages; ++s) {
      mbar_init(full(s), 1);
      mbar_init(empty(s), kConsumerThreads);
    }
    mbar_init_fence();
  }
  __syncthreads();

  const int wg = threadIdx.x / kWarpgroupThreads;
  if (wg == 0) {
    // ---- producer ----
    regs_dec<kProducerRegs>();
    if (threadIdx.x != 0) return;
    const int32_t row_q = static_cast<int32_t>(seq.start + q0);
    mbar_arrive_expect_tx(q_full, fwd_q_bytes(kD));
    for (int c = 0; c < kChunks; ++c)
      tma_load_3d(base + static_cast<uint32_t>(q_chunk_at(kD, c)), &tq, q_full, c * kChunkCols, static_cast<int32_t>(h),
                  row_q);
    for (int64_t it = 0; it < n_tiles; ++it) {
      const int s = static_cast<int>(it % kStages);
      mbar_wait(empty(s), static_cast<uint32_t>((it / kStages) & 1) ^ 1u);
      mbar_arrive_expect_tx(full(s), fwd_stage_bytes(kD));
      const int32_t row_k = static_cast<int32_t>(seq.start + (kt.first + it) * kBkv);
      for (int c = 0; c < kChunks; ++c) {
        tma_load_3d(base + static_cast<uint32_t>(k_chunk_at(kD, s, c)), &tk, full(s), c * kChunkCols,
                    static_cast<int32_t>(hk), row_k);
        tma_load_3d(base + static_cast<uint32_t>(v_chunk_at(kD, s, c)), &tv, full(s), c * kChunkCols,
                    static_cast<int32_t>(hk), row_k);
      }
    }
    return;
  }

  // ---- consumers: warpgroup cw owns query rows [q_lo, q_lo + 64) ----
  regs_inc<kConsumerRegs>();
  const int cw = wg - 1;
  const int64_t q_lo = q0 + cw * kRowsPerWarpgroup;
  const int64_t wr = q_lo + (threadIdx.x % kWarpgroupThreads) / 32 * kRowsPerWarp;  // this warp's first row
  const float scale2 = a.scale * kLog2e;

  float o[kDs][4];
  zero(o);
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  mbar_wait(q_full, 0);
  for (int64_t it = 0; it < n_tiles; ++it) {
    const int s = static_cast<int>(it % kStages);
    const int64_t k0 = (kt.first + it) * kBkv;
    mbar_wait(full(s), static_cast<uint32_t>((it / kStages) & 1));
    if (tile_visible_any(q_lo, kRowsPerWarpgroup, k0, kBkv, seq.len, a.window)) {
      // S = Q Kᵀ: k-step ks reads columns [16 ks, 16 ks + 16) of chunk ks / 4 of both tiles.
      float sc[kNs][4];
      wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < kKs; ++ks) {
        const uint64_t da = desc_sw128(base + static_cast<uint32_t>(q_operand_at(kD, cw, ks)), 16, kSwizzleAtomBytes);
        const uint64_t db = desc_sw128(base + static_cast<uint32_t>(k_operand_at(kD, s, ks)), 16, kSwizzleAtomBytes);
        wgmma_ss<kBkv>(sc, da, db, ks > 0 ? 1 : 0);
      }
      wgmma_commit();
      wgmma_wait_all();
      fence_operand(sc);

      // Online softmax (log2 domain), as flash_fwd_kernel.
      float mx[2] = {m[0], m[1]};
      if (tile_needs_mask(q_lo, kRowsPerWarpgroup, k0, kBkv, seq.len, a.window)) {
#pragma unroll
        for (int nt = 0; nt < kNs; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int64_t i = wr + acc_row(e), kj = k0 + acc_col(nt, e);
            sc[nt][e] = visible(i, kj, seq.len, a.window) ? sc[nt][e] * scale2 : -INFINITY;
            mx[e / 2] = fmaxf(mx[e / 2], sc[nt][e]);
          }
      } else {
#pragma unroll
        for (int nt = 0; nt < kNs; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            sc[nt][e] *= scale2;
            mx[e / 2] = fmaxf(mx[e / 2], sc[nt][e]);
          }
      }
      float alpha[2], base_m[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
        // A row with nothing visible yet keeps m = -inf; exp2 against 0 then gives exact zeros.
        base_m[r] = mx[r] == -INFINITY ? 0.0f : mx[r];
        alpha[r] = exp2f(m[r] - base_m[r]);
        m[r] = mx[r];
        l[r] *= alpha[r];
      }
#pragma unroll
      for (int nt = 0; nt < kNs; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          sc[nt][e] = exp2f(sc[nt][e] - base_m[e / 2]);
          l[e / 2] += sc[nt][e];
        }
#pragma unroll
      for (int dt = 0; dt < kDs; ++dt) {
        o[dt][0] *= alpha[0];
        o[dt][1] *= alpha[0];
        o[dt][2] *= alpha[1];
        o[dt][3] *= alpha[1];
      }
      // P as bf16 A fragments, all of them before the first wgmma reads any: the registers must
      // stay untouched until the wait below.
      uint32_t pa[kBkv / 16][4];
#pragma unroll
      for (int kj = 0; kj < kBkv / 16; ++kj) acc_to_a(pa[kj], sc, kj);

      // O += P V: k-step kj reads keys [16 kj, 16 kj + 16) of the stage, i.e. two 8-row groups
      // starting 16 kj x 128 bytes (a multiple of the 1024-byte atom) into each chunk. O (rescaled
      // above) and P are pinned before the fence so that their writes precede it.
      fence_operand(o);
      fence_operand(pa);
      wgmma_fence();
#pragma unroll
      for (int kj = 0; kj < kBkv / 16; ++kj)
#pragma unroll
        for (int c = 0; c < kChunks; ++c) {
          const uint64_t db = desc_sw128(base + static_cast<uint32_t>(v_operand_at(kD, s, kj, c)),
                                         static_cast<uint32_t>(kL.kv_chunk), kSwizzleAtomBytes);
          wgmma_rs_n64(tiles_at<64>(o, c * 8), pa[kj], db);
        }
      wgmma_commit();
      wgmma_wait_all();
      fence_operand(o);
      fence_operand(pa);
    }
    mbar_arrive(empty(s));
  }

  // Each of the 4 threads of a row summed its own columns.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
  }
  store_rows<kD>(static_cast<bf16_t*>(a.out), a.H, h, seq, wr, o, 1.0f / l[0], 1.0f / l[1]);
  if (threadIdx.x % 4 == 0)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t i = wr + acc_row(2 * r);
      if (i < seq.len) a.lse[lse_index(a, b, seq, h, i)] = (m[r] + log2f(l[r])) * kLn2;
    }
#elif defined(__CUDA_ARCH__)
  __trap();  // another architecture: the dispatcher never launches this kernel there
#endif
}

template <int kD>
cudaError_t run_fwd(const FlashArgs& a, const Sm90Plan& plan, cudaStream_t s) {
  CUtensorMap tq{}, tk{}, tv{};
  cudaError_t e = encode_tensor_map(&tq, a.q, plan.q);
  if (e == cudaSuccess) e = encode_tensor_map(&tk, a.k, plan.k);
  if (e == cudaSuccess) e = encode_tensor_map(&tv, a.v, plan.v);
  if (e != cudaSuccess) return e;
  const auto kernel = flash_fwd_sm90_kernel<kD>;
  e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(plan.smem_bytes));
  if (e != cudaSuccess) return e;
  const dim3 grid(static_cast<unsigned>(plan.grid.x), static_cast<unsigned>(plan.grid.y),
                  static_cast<unsigned>(plan.grid.z));
  kernel<<<grid, kThreads, static_cast<size_t>(plan.smem_bytes), s>>>(tq, tk, tv, a);
  return cudaGetLastError();
}

}  // namespace
}  // namespace moeforge::cuda::flash::sm90

namespace moeforge::cuda::launch {

cudaError_t flash_attention_fwd_sm90(const flash::FlashArgs& args, const flash::sm90::Sm90Plan& plan, cudaStream_t s) {
  return args.D == 64 ? flash::sm90::run_fwd<64>(args, plan, s) : flash::sm90::run_fwd<128>(args, plan, s);
}

}  // namespace moeforge::cuda::launch
