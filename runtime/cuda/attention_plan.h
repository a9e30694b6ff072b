// Launch planning of the fused (flash) attention kernels (runtime/cuda/flash_attention*.cu): tile
// sizes per head dim, grid sizes, shared-memory bytes, and the key/query tile ranges a tile of
// the causal, optionally sliding-window, mask touches. Plain C++ so that the CPU tests check the
// very logic the kernels run (tests/runtime/test_attention_plan.cpp).
//
// Shapes. Dense: q (B, T, H, D), k and v (B, T, Hkv, D), lse (B, H, T). Packed variable-length
// (cu_seqlens, B + 1 i32 cumulative lengths): q (R, H, D), k and v (R, Hkv, D), lse (H, R) with R
// the total rows; sequence b holds rows [cu[b], cu[b+1]) and T is the longest sequence. Query i of
// a sequence attends to keys j of the same sequence with j <= i and, with a window W > 0
// (Mistral's sliding window), i - j < W.
//
// Every kernel runs kFlashWarps warps; each warp owns 16 rows (the mma.sync m16n8k16 tile height)
// of the block's query tile (forward, dq) or key tile (dk, dv). The tile constants are constexpr
// so that the kernels take them as template parameters (flash-attention's habit: runtime choices
// become template parameters once, at the launcher).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define MOE_HOST_DEVICE __host__ __device__
#else
#define MOE_HOST_DEVICE
#endif

namespace moeforge::cuda::flash {

constexpr int kFlashWarps = 4;
constexpr int kFlashThreads = kFlashWarps * 32;
constexpr int kRowsPerWarp = 16;
// Shared-memory rows are padded by 8 bf16 (16 bytes) so that the 8 rows a fragment load touches
// fall in different banks.
constexpr int kSmemPad = 8;

struct Tile {
  int block_q;   // query rows per tile
  int block_kv;  // key rows per tile
};

// The forward and dq kernels: block_q = 4 warps x 16 query rows; head dim 128 halves the key tile
// so that K and V tiles plus the Q tile stay near 50 KiB of shared memory.
constexpr Tile fwd_tile(int d) { return d <= 64 ? Tile{64, 64} : Tile{64, 32}; }
constexpr Tile dq_tile(int d) { return fwd_tile(d); }
// The dk/dv kernel: block_kv = 4 warps x 16 key rows, iterating over query tiles.
constexpr Tile dkv_tile(int d) { return d <= 64 ? Tile{64, 64} : Tile{32, 64}; }

constexpr bool supported_head_dim(int64_t d) { return d == 64 || d == 128; }

// Whether query i may attend to key j in a sequence of `len` rows with window w (0: no window).
MOE_HOST_DEVICE inline bool visible(int64_t i, int64_t j, int64_t len, int64_t w) {
  return j <= i && i < len && (w <= 0 || i - j < w);
}

// [first, last) tiles of size `block` covering the half-open row range [lo, hi) (empty if hi <= lo).
struct TileRange {
  int64_t first, last;
};
MOE_HOST_DEVICE inline TileRange tiles_covering(int64_t lo, int64_t hi, int64_t block) {
  if (hi <= lo) return {0, 0};
  return {lo / block, (hi + block - 1) / block};
}

// The key tiles that queries [q0, q0 + block_q) of a sequence of `len` rows see.
MOE_HOST_DEVICE inline TileRange key_tiles(int64_t q0, int block_q, int block_kv, int64_t len, int64_t w) {
  const int64_t q_last = (q0 + block_q < len ? q0 + block_q : len) - 1;  // the last real query
  const int64_t lo = w > 0 && q0 - w + 1 > 0 ? q0 - w + 1 : 0;
  return tiles_covering(lo, q_last + 1, block_kv);
}

// The query tiles that see keys [k0, k0 + block_kv) of a sequence of `len` rows.
MOE_HOST_DEVICE inline TileRange query_tiles(int64_t k0, int block_q, int block_kv, int64_t len, int64_t w) {
  const int64_t k_last = (k0 + block_kv < len ? k0 + block_kv : len) - 1;
  const int64_t hi = w > 0 && k_last + w < len ? k_last + w : len;
  return tiles_covering(k0, hi, block_q);
}

// Causal attention does ~half the work of its first query tiles in the last ones; the kernels
// take tiles from the longest (last) to the shortest so the tail of the grid is short tiles.
MOE_HOST_DEVICE inline int64_t tile_of_block(int64_t block_x, int64_t grid_x) { return grid_x - 1 - block_x; }

struct Grid {
  int64_t x, y, z;
};

struct KernelPlan {
  Tile tile;
  Grid grid;
  int64_t smem_bytes;  // dynamic shared memory
};

// The problem as the launcher sees it. cu_seqlens is not read here (it is on the device): a
// varlen problem passes B sequences, their longest length as T and the total rows.
struct Problem {
  int64_t B, T, H, Hkv, D;
  int64_t window;      // 0: plain causal
  bool varlen;
  int64_t total_rows;  // B * T when dense
};

struct Plan {
  KernelPlan fwd, dq, dkv;
  int64_t delta_rows;  // rows of the dO·O pre-pass (one per query row and head)
};

// The kernels' arguments: device pointers (bf16 tensors as void*, since this header is also
// compiled without CUDA) and the problem's sizes. The backward reads q, k, v, out, lse and dout and
// writes dq, dk, dv (bf16, the layouts of q, k, v) and delta, scratch of lse's layout.
struct FlashArgs {
  const void* q;      // (B, T, H, D) or (R, H, D)
  const void* k;      // (B, T, Hkv, D) or (R, Hkv, D)
  const void* v;
  void* out;          // like q
  float* lse;         // (B, H, T) or (H, R): written by the forward, read by the backward
  const void* dout;   // like q
  void* dq;           // like q
  void* dk;           // like k
  void* dv;           // like k
  float* delta;       // like lse
  const int32_t* cu_seqlens;  // (B + 1) or nullptr (dense)
  int64_t B, T, H, Hkv, D;
  int64_t window;
  int64_t total_rows;
  float scale;
};

// Plans the three kernels; throws moeforge::Error naming the problem when the head dim is not 64
// or 128, H is not a multiple of Hkv, a size is not positive, or a grid dimension overflows.
// max_smem is the device's opt-in shared memory per block.
Plan plan_flash_attention(const Problem& p, int64_t max_smem);

// Bytes of dynamic shared memory of a kernel staging `rows` tiles rows of D bf16 (padded) plus
// `floats` per-row floats.
int64_t tile_smem_bytes(int64_t rows, int64_t d, int64_t floats);

}  // namespace moeforge::cuda::flash
