// Hopper (sm_90a) primitives of the wgmma attention kernels (flash_attention_sm90.cu,
// flash_attention_sm90_bwd.cu): mbarriers, TMA bulk tensor copies, wgmma shared-memory
// descriptors and the wgmma instructions themselves, as inline PTX. Only those two files include
// this, and they are compiled for sm_90a alone (runtime/CMakeLists.txt); their kernels guard
// their bodies with __CUDA_ARCH_FEAT_SM90_ALL, so another pass never assembles these instructions.
//
// wgmma operands (PTX ISA, "Asynchronous Warpgroup Level Matrix Shared Memory Layout"):
//   - A is 64 x 16 (M x K), from shared memory (descriptor) or registers; B is 16 x N from shared
//     memory. imm-trans 0 reads an operand K-major (K contiguous: Q and K rows, D contiguous),
//     imm-trans-b 1 reads B MN-major (N contiguous: V rows, keys are K and D is N).
//   - The descriptor (64 bits): start address >> 4 in bits 0-13, leading-dimension byte offset
//     >> 4 in bits 16-29, stride-dimension byte offset >> 4 in bits 32-45, base offset in bits
//     49-51, swizzle mode in bits 62-63 (1 = 128B).
//   - With the 128-byte swizzle, the canonical layouts (CuTe notation, T = 8 bf16 = 16 bytes) are
//       K-major:  Swizzle<3,4,3> o ((8,m),(T,2k)) : ((8T,SBO),(1,T))   LBO unused (1)
//       MN-major: Swizzle<3,4,3> o ((T,8,m),(8,k)) : ((1,T,LBO),(8T,SBO))
//     i.e. rows of 128 bytes, 8 consecutive rows form a 1024-byte swizzle atom, in which the 16-byte
//     unit u of row r sits at unit u ^ (r % 8). That is exactly what TMA writes for a box whose
//     inner extent is 128 bytes with CU_TENSOR_MAP_SWIZZLE_128B into a 1024-byte-aligned buffer.
//     K-major (Q, K): SBO = 1024 (the next 8 rows); the k-th 16-column step of a 64-column chunk
//     starts 32 k bytes into the row (the hardware applies the XOR to the computed address, so a
//     start inside the atom's first row is legal: base offset stays 0 because the atom is
//     1024-aligned and the step is < 128 bytes). MN-major (V): SBO = 1024 (the next 8 keys); LBO
//     would step to the next 64 columns of N, unused because every B here is exactly 64 wide.
//   - Accumulator D (64 x N, f32): warp w of the warpgroup holds rows 16w..16w+15 and, per n8
//     tile nt, the four floats of the mma.sync m16n8 C fragment: d[nt][0..1] at (g, 8nt + 2t..),
//     d[nt][2..3] at (g + 8, 8nt + 2t..), g = lane / 4, t = lane % 4. A from registers uses the
//     m16n8k16 A fragment per warp, so S's accumulators re-pack into P's A operand as with
//     mma.sync (acc_to_a in flash_attention.cuh).
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "runtime/cuda/attention_plan_sm90.h"

namespace moeforge::cuda::flash::sm90 {

// Host: the bf16 tensor map of t (3-D {D, heads, rows}, box {64, 1, rows}) with the 128-byte
// swizzle the descriptors below assume (flash_attention_sm90.cu).
cudaError_t encode_tensor_map(CUtensorMap* map, const void* data, const TensorBox& t);

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// ---- mbarrier ----------------------------------------------------------------------------------

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}

// Makes the initialised barriers visible to the other threads and to the async (TMA) proxy.
__device__ __forceinline__ void mbar_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

// One arrival that also expects `bytes` more transaction bytes (the TMA copies that follow).
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}

__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}

// This many failed polls (each try_wait also blocks for a hardware-defined while, so seconds in
// all; real waits are microseconds) mean a lost arrival or TMA transaction: the kernel traps, so
// the launch fails with an error instead of hanging the device.
constexpr uint32_t kHangPolls = 1u << 28;

// Waits until the phase of parity `parity` completed. A fresh barrier is in phase 0, and waiting
// for parity 1 (the phase "before" it) returns at once: the producer's first pass over the ring.
// The loop is in PTX (labels are local to the braces): a trap in C++ here costs the consumer
// loop registers (ptxas spilled ~160 bytes around it).
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred p;\n.reg .b32 n;\n"
      "mov.u32 n, 0;\n"
      "WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      "@p bra DONE;\n"
      "add.u32 n, n, 1;\n"
      "setp.lt.u32 p, n, %2;\n"
      "@p bra WAIT;\n"
      "trap;\n"
      "DONE:\n}\n" ::"r"(bar),
      "r"(parity), "n"(kHangPolls)
      : "memory");
}

// ---- TMA ---------------------------------------------------------------------------------------

// Copies the box at coordinates (c0, c1, c2) (innermost first) of the tensor map into shared
// memory at `dst`, completing `bytes` of the barrier's transaction count (out-of-bounds elements
// are written as zeros and still counted).
__device__ __forceinline__ void tma_load_3d(uint32_t dst, const CUtensorMap* map, uint32_t bar, int32_t c0,
                                            int32_t c1, int32_t c2) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], "
      "[%5];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(bar)
      : "memory");
}

__device__ __forceinline__ void tma_prefetch_map(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}

// ---- registers ---------------------------------------------------------------------------------

// setmaxnreg: the producer warpgroup gives registers back, the consumers take them.
template <int kRegs>
__device__ __forceinline__ void regs_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}
template <int kRegs>
__device__ __forceinline__ void regs_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}

// ---- wgmma -------------------------------------------------------------------------------------

// A 128-byte-swizzled shared-memory operand starting at `addr` (see the header comment).
__device__ __forceinline__ uint64_t desc_sw128(uint32_t addr, uint32_t lbo_bytes, uint32_t sbo_bytes) {
  uint64_t d = 0;
  d |= static_cast<uint64_t>((addr & 0x3FFFFu) >> 4);
  d |= static_cast<uint64_t>((lbo_bytes >> 4) & 0x3FFFu) << 16;
  d |= static_cast<uint64_t>((sbo_bytes >> 4) & 0x3FFFu) << 32;
  d |= uint64_t{1} << 62;
  return d;
}

// Orders the warpgroup's register writes before the wgmma that reads them (accumulators, A).
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }

// Pins registers written or read asynchronously by wgmma at this point of the program: the
// compiler may not move their uses across it (CUTLASS's warpgroup_fence_operand).
template <int kTiles>
__device__ __forceinline__ void fence_operand(float (&r)[kTiles][4]) {
#pragma unroll
  for (int i = 0; i < kTiles; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(r[i][e])::"memory");
}
template <int kTiles>
__device__ __forceinline__ void fence_operand(uint32_t (&r)[kTiles][4]) {
#pragma unroll
  for (int i = 0; i < kTiles; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+r"(r[i][e])::"memory");
}

// D (64 x 64, f32) (+)= A (64 x 16, shared, K-major) * B (16 x 64, shared, K-major); scale_d 0
// overwrites D.
__device__ __forceinline__ void wgmma_ss_n64(float (&d)[8][4], uint64_t desc_a, uint64_t desc_b, int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\n"
      "setp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
      "}, %32, %33, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]),
        "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
        "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),
        "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
        "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]),
        "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
        "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]),
        "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
}

// D (64 x 128, f32) (+)= A (64 x 16, shared, K-major) * B (16 x 128, shared, K-major); scale_d 0
// overwrites D.
__device__ __forceinline__ void wgmma_ss_n128(float (&d)[16][4], uint64_t desc_a, uint64_t desc_b, int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\n"
      "setp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
      "}, %64, %65, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]),
        "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
        "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),
        "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
        "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]),
        "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
        "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]),
        "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]),
        "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]),
        "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]),
        "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]),
        "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]),
        "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]),
        "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]),
        "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]),
        "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
}

// The n8 tiles [first, first + kN / 8) of an accumulator array, as the array a wgmma of width kN
// writes.
template <int kN, int kTiles>
__device__ __forceinline__ float (&tiles_at(float (&acc)[kTiles][4], int first))[kN / 8][4] {
  return *reinterpret_cast<float(*)[kN / 8][4]>(&acc[first]);
}

template <int kN>
__device__ __forceinline__ void wgmma_ss(float (&d)[kN / 8][4], uint64_t desc_a, uint64_t desc_b, int scale_d) {
  static_assert(kN == 64 || kN == 128, "wgmma_ss: N is 64 or 128");
  if constexpr (kN == 64)
    wgmma_ss_n64(d, desc_a, desc_b, scale_d);
  else
    wgmma_ss_n128(d, desc_a, desc_b, scale_d);
}

// D (64 x 64, f32) += A (64 x 16, registers) * B (16 x 64, shared, MN-major: imm-trans-b 1).
__device__ __forceinline__ void wgmma_rs_n64(float (&d)[8][4], const uint32_t (&a)[4], uint64_t desc_b) {
  asm volatile(
      "{\n.reg .pred p;\n"
      "setp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
      "}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]),
        "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
        "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),
        "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
        "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]),
        "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
        "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]),
        "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
}

}  // namespace moeforge::cuda::flash::sm90
