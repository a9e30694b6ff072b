// Launch planning of the Hopper (sm_90a) fused attention (runtime/cuda/flash_attention_sm90.cu,
// the forward; flash_attention_sm90_bwd.cu, the backward): tiles, grids, the shared-memory
// layouts, the TMA tensor-map shapes and the per-tile mask tests. Plain C++ (header only, no CUDA
// types) so that the CPU tests check the very numbers the kernels and their launchers use
// (tests/runtime/test_attention_plan_sm90.cpp). Shapes, masks and the lse layout are those of
// attention_plan.h.
//
// Forward.
//
// Block: three warpgroups of 128 threads. Warpgroup 0 is the producer (one thread issues the TMA
// copies, the rest exit after giving their registers back); warpgroups 1 and 2 are consumers, each owning
// 64 query rows (the wgmma M) of the block's 128-row query tile. The K and V tiles of a key tile
// go through a kStages-deep shared-memory ring: full[s] completes when the TMA bytes of stage s
// landed, empty[s] when all 256 consumer threads are done reading it.
//
// Shared memory (offsets from a 1024-byte-aligned base; the 128-byte swizzle repeats every 8 rows
// of 128 bytes, so every tile chunk starts on a 1024-byte boundary):
//   Q:        D/64 chunks of (block_q rows x 128 bytes)              [chunk][row][64 bf16]
//   K[stage]: D/64 chunks of (block_kv rows x 128 bytes), kStages    [stage][chunk][row][64 bf16]
//   V[stage]: like K
//   barriers: q_full, full[kStages], empty[kStages] (8 bytes each)
// A chunk holds columns [64c, 64c + 64) of the head dim: one TMA box of {64 columns, 1 head, rows}
// (the box's inner extent is capped at the swizzle span, 128 bytes), written swizzled.
#pragma once

#include <cstdint>
#include <limits>

#include "runtime/cuda/attention_plan.h"

namespace moeforge::cuda::flash::sm90 {

constexpr int kWarpgroupThreads = 128;
constexpr int kConsumerWarpgroups = 2;
constexpr int kThreads = (1 + kConsumerWarpgroups) * kWarpgroupThreads;
constexpr int kConsumerThreads = kConsumerWarpgroups * kWarpgroupThreads;
constexpr int kRowsPerWarpgroup = 64;  // the wgmma M
constexpr int kStages = 2;
constexpr int kSwizzleBytes = 128;
constexpr int kChunkCols = kSwizzleBytes / 2;         // bf16 columns per swizzled 128-byte row
constexpr int kSwizzleAtomBytes = 8 * kSwizzleBytes;  // 8 rows: the swizzle pattern's period
// setmaxnreg: the producer drops to 24 registers per thread so the consumers can take 240
// (128 x 24 + 256 x 240 = 64512 <= 65536 registers of the multiprocessor).
constexpr int kProducerRegs = 24;
constexpr int kConsumerRegs = 240;
constexpr int kBarriers = 1 + 2 * kStages;

// Query tile: two consumer warpgroups x 64 rows. Key tile: 128 rows for both head dims (the S
// accumulators of a 64 x 128 tile are 64 floats per thread, O at head dim 128 another 64).
MOE_HOST_DEVICE constexpr Tile fwd_tile(int) { return Tile{kConsumerWarpgroups * kRowsPerWarpgroup, 128}; }

struct SmemLayout {
  int64_t q, k, v, barriers;  // byte offsets from the aligned base
  int64_t q_chunk;            // bytes of one 64-column chunk of the Q tile
  int64_t kv_chunk;           // bytes of one 64-column chunk of a K or V tile
  int64_t kv_stage;           // bytes of one stage of K (or of V): all its chunks
  int64_t bytes;              // dynamic shared memory to request, alignment slack included
};

MOE_HOST_DEVICE constexpr SmemLayout smem_layout(int d) {
  const Tile t = fwd_tile(d);
  const int64_t chunks = d / kChunkCols;
  SmemLayout l{};
  l.q_chunk = int64_t{t.block_q} * kSwizzleBytes;
  l.kv_chunk = int64_t{t.block_kv} * kSwizzleBytes;
  l.kv_stage = chunks * l.kv_chunk;
  l.q = 0;
  l.k = l.q + chunks * l.q_chunk;
  l.v = l.k + kStages * l.kv_stage;
  l.barriers = l.v + kStages * l.kv_stage;
  // The dynamic shared memory base is only 16-byte aligned: up to 1008 bytes go to aligning it.
  l.bytes = l.barriers + 8 * kBarriers + kSwizzleAtomBytes;
  return l;
}

// Shared-memory byte offsets (from the aligned base) used by the kernel, here so that the CPU
// test can replay them against a model of the TMA swizzle and the wgmma canonical layouts.
// TMA destination of chunk c of the Q tile, and of K (or V) in stage s.
MOE_HOST_DEVICE constexpr int64_t q_chunk_at(int d, int c) { return smem_layout(d).q + c * smem_layout(d).q_chunk; }
MOE_HOST_DEVICE constexpr int64_t k_chunk_at(int d, int s, int c) {
  return smem_layout(d).k + s * smem_layout(d).kv_stage + c * smem_layout(d).kv_chunk;
}
MOE_HOST_DEVICE constexpr int64_t v_chunk_at(int d, int s, int c) {
  return smem_layout(d).v + s * smem_layout(d).kv_stage + c * smem_layout(d).kv_chunk;
}
// wgmma start addresses. S = Q Kᵀ, k-step ks (head-dim columns [16 ks, 16 ks + 16)), consumer
// warpgroup cw (Q rows [64 cw, 64 cw + 64)): the columns lie in chunk ks / 4, 32 (ks % 4) bytes
// into each 128-byte row; both operands K-major, 8-row groups 1024 bytes apart (SBO).
MOE_HOST_DEVICE constexpr int64_t q_operand_at(int d, int cw, int ks) {
  return q_chunk_at(d, ks / 4) + int64_t{cw} * kRowsPerWarpgroup * kSwizzleBytes + (ks % 4) * 32;
}
MOE_HOST_DEVICE constexpr int64_t k_operand_at(int d, int s, int ks) {
  return k_chunk_at(d, s, ks / 4) + (ks % 4) * 32;
}
// O += P V, k-step kj (keys [16 kj, 16 kj + 16)), head-dim chunk c as one N = 64 wgmma: V is
// MN-major, the keys are rows 128 bytes apart, 8-row groups 1024 bytes apart (SBO).
MOE_HOST_DEVICE constexpr int64_t v_operand_at(int d, int s, int kj, int c) {
  return v_chunk_at(d, s, c) + int64_t{kj} * 16 * kSwizzleBytes;
}

// A TMA tensor map's shape (cuTensorMapEncodeTiled's arguments), innermost dimension first: a
// (rows, heads, D) bf16 tensor seen as 3-D {D, heads, rows} with byte strides {2 D, 2 heads D}
// for dimensions 1 and 2, and a box of {64 columns, 1 head, box_rows rows}.
struct TensorBox {
  uint64_t dims[3];
  uint64_t strides[2];  // bytes, dimensions 1 and 2
  uint32_t box[3];
};

constexpr TensorBox tensor_box(int64_t rows, int64_t heads, int64_t d, int box_rows) {
  return TensorBox{{static_cast<uint64_t>(d), static_cast<uint64_t>(heads), static_cast<uint64_t>(rows)},
                   {static_cast<uint64_t>(d * 2), static_cast<uint64_t>(heads * d * 2)},
                   {static_cast<uint32_t>(kChunkCols), 1u, static_cast<uint32_t>(box_rows)}};
}

// The barriers' transaction bytes: the Q tile (q_full), one stage's K and V tiles (full[s]).
MOE_HOST_DEVICE constexpr uint32_t fwd_q_bytes(int d) { return static_cast<uint32_t>(fwd_tile(d).block_q * d * 2); }
MOE_HOST_DEVICE constexpr uint32_t fwd_stage_bytes(int d) {
  return static_cast<uint32_t>(2 * fwd_tile(d).block_kv * d * 2);
}

struct Sm90Plan {
  Tile tile;
  Grid grid;           // (query tiles, H, B)
  int64_t smem_bytes;  // dynamic shared memory
  TensorBox q, k, v;   // q: (R, H, D) rows of block_q; k, v: (R, Hkv, D) rows of block_kv
};

// Why the Hopper kernel cannot run `p` on a device with `max_smem` bytes of opt-in shared memory
// per block, or nullptr when it can. The problem itself was validated by plan_flash_attention.
inline const char* unsupported_reason(const Problem& p, int64_t max_smem) {
  if (!supported_head_dim(p.D)) return "head dim is not 64 or 128";
  if (smem_layout(static_cast<int>(p.D)).bytes > max_smem) return "the tiles exceed the device's shared memory";
  // TMA coordinates are int32: the last tile may start up to a tile past the last row.
  if (p.total_rows + fwd_tile(static_cast<int>(p.D)).block_q > std::numeric_limits<int32_t>::max())
    return "more rows than int32 TMA coordinates address";
  if (p.total_rows < 1) return "no rows";
  return nullptr;
}

// The plan of a problem unsupported_reason accepted.
constexpr Sm90Plan plan_fwd(const Problem& p) {
  const int d = static_cast<int>(p.D);
  const Tile t = fwd_tile(d);
  Sm90Plan plan{};
  plan.tile = t;
  plan.grid = Grid{(p.T + t.block_q - 1) / t.block_q, p.H, p.B};
  plan.smem_bytes = smem_layout(d).bytes;
  plan.q = tensor_box(p.total_rows, p.H, p.D, t.block_q);
  plan.k = tensor_box(p.total_rows, p.Hkv, p.D, t.block_kv);
  plan.v = plan.k;
  return plan;
}

// Whether some real query i in [q_lo, q_lo + rows) (i < len) fails to see some key j in
// [k0, k0 + block_kv): then the tile needs the per-element mask. Visibility shrinks as j grows
// (j <= i) and as i grows (i - j < w), so the worst pairs are (q_lo, k0 + block_kv - 1) and
// (last real row, k0). No real rows: false (nothing is stored).
MOE_HOST_DEVICE inline bool tile_needs_mask(int64_t q_lo, int rows, int64_t k0, int block_kv, int64_t len, int64_t w) {
  const int64_t i_hi = (q_lo + rows < len ? q_lo + rows : len) - 1;
  if (i_hi < q_lo) return false;
  return k0 + block_kv - 1 > q_lo || (w > 0 && i_hi - k0 >= w);
}

// Whether some real query of [q_lo, q_lo + rows) sees some key of [k0, k0 + block_kv); a tile no
// row sees contributes nothing (its scores are all -inf) and is skipped.
MOE_HOST_DEVICE inline bool tile_visible_any(int64_t q_lo, int rows, int64_t k0, int block_kv, int64_t len, int64_t w) {
  const int64_t i_hi = (q_lo + rows < len ? q_lo + rows : len) - 1;
  if (i_hi < q_lo || k0 >= len) return false;
  if (k0 > i_hi) return false;  // every key is after every row
  // The closest pair for the window: distance 0 where the key and row ranges overlap, else the
  // first row against the last key.
  const int64_t gap = q_lo - (k0 + block_kv - 1);
  return w <= 0 || gap < w;
}

// The dk/dv kernel sums over queries, so a query tile reaching past the sequence end needs the
// mask too (its rows may belong to the next packed sequence); the forward and dq kernels only
// drop such rows when storing. False means every (query, key) pair of the tile is visible.
MOE_HOST_DEVICE inline bool dkv_tile_needs_mask(int64_t q0, int q_rows, int64_t k_lo, int k_rows, int64_t len,
                                                int64_t w) {
  return q0 + q_rows > len || tile_needs_mask(q0, q_rows, k_lo, k_rows, len, w);
}

// ---- backward (flash_attention_sm90_bwd.cu) ------------------------------------------------------
//
// Two kernels, as the mma.sync backward (no atomics, deterministic), on the forward's block
// layout: a producer warpgroup and two consumer warpgroups of 64 rows. Each block keeps two
// "resident" tiles of 128 rows (loaded once) and streams two "ring" tiles of 64 rows per step
// through a kStages-deep ring:
//   dq:  resident Q, dO (the block's 128 queries); ring K, V (key tiles).
//        S = Q Kᵀ, dP = dO Vᵀ (shared x shared), dS = P (dP - delta), dQ += dS K (K MN-major).
//   dkv: resident K, V (the block's 128 keys of one kv head); ring Q, dO (the query tiles of each
//        query head of the group). Sᵀ = K Qᵀ, dPᵀ = V dOᵀ, dV += Pᵀ dO, dK += dSᵀ Q (MN-major).
// Shared memory: resident tile r (0, 1) in D/64 chunks of 128 rows, then ring tile x (0, 1) of
// stage s in D/64 chunks of 64 rows, then the barriers (res_full, full[kStages], empty[kStages]).
constexpr int kBwdResidentRows = kConsumerWarpgroups * kRowsPerWarpgroup;
constexpr int kBwdRingRows = 64;

struct BwdLayout {
  int64_t resident;  // first byte of resident tile 0; tile 1 follows
  int64_t ring;      // first byte of the ring: [stage][tile x][chunk]
  int64_t barriers;
  int64_t resident_chunk;  // bytes of one 64-column chunk of a resident tile
  int64_t resident_tile;   // bytes of one resident tile (all chunks)
  int64_t ring_chunk;      // bytes of one 64-column chunk of a ring tile
  int64_t ring_tile;       // bytes of one ring tile
  int64_t ring_stage;      // bytes of one stage: both ring tiles
  int64_t bytes;           // dynamic shared memory to request, alignment slack included
};

MOE_HOST_DEVICE constexpr BwdLayout bwd_layout(int d) {
  const int64_t chunks = d / kChunkCols;
  BwdLayout l{};
  l.resident_chunk = int64_t{kBwdResidentRows} * kSwizzleBytes;
  l.resident_tile = chunks * l.resident_chunk;
  l.ring_chunk = int64_t{kBwdRingRows} * kSwizzleBytes;
  l.ring_tile = chunks * l.ring_chunk;
  l.ring_stage = 2 * l.ring_tile;
  l.resident = 0;
  l.ring = 2 * l.resident_tile;
  l.barriers = l.ring + kStages * l.ring_stage;
  l.bytes = l.barriers + 8 * kBarriers + kSwizzleAtomBytes;
  return l;
}

// TMA destinations: chunk c of resident tile r; chunk c of ring tile x in stage s.
MOE_HOST_DEVICE constexpr int64_t resident_chunk_at(int d, int r, int c) {
  return bwd_layout(d).resident + r * bwd_layout(d).resident_tile + c * bwd_layout(d).resident_chunk;
}
MOE_HOST_DEVICE constexpr int64_t ring_chunk_at(int d, int x, int s, int c) {
  return bwd_layout(d).ring + s * bwd_layout(d).ring_stage + x * bwd_layout(d).ring_tile + c * bwd_layout(d).ring_chunk;
}
// wgmma start addresses: a resident tile as the K-major A of warpgroup cw (its 64 rows), k-step
// ks over the head dim; a ring tile as the K-major B (its 64 rows are N), k-step ks; a ring tile
// as the MN-major B of k-step kj (its rows [16 kj, 16 kj + 16) are K) and head-dim chunk c (N).
MOE_HOST_DEVICE constexpr int64_t resident_operand_at(int d, int r, int cw, int ks) {
  return resident_chunk_at(d, r, ks / 4) + int64_t{cw} * kRowsPerWarpgroup * kSwizzleBytes + (ks % 4) * 32;
}
MOE_HOST_DEVICE constexpr int64_t ring_operand_at(int d, int x, int s, int ks) {
  return ring_chunk_at(d, x, s, ks / 4) + (ks % 4) * 32;
}
MOE_HOST_DEVICE constexpr int64_t ring_mn_operand_at(int d, int x, int s, int kj, int c) {
  return ring_chunk_at(d, x, s, c) + int64_t{kj} * 16 * kSwizzleBytes;
}

// The barriers' transaction bytes: both resident tiles (res_full), one stage's two ring tiles.
MOE_HOST_DEVICE constexpr uint32_t bwd_resident_bytes(int d) {
  return static_cast<uint32_t>(2 * kBwdResidentRows * d * 2);
}
MOE_HOST_DEVICE constexpr uint32_t bwd_stage_bytes(int d) { return static_cast<uint32_t>(2 * kBwdRingRows * d * 2); }

struct Sm90BwdPlan {
  Grid dq_grid;                 // (query tiles of 128, H, B)
  Grid dkv_grid;                // (key tiles of 128, Hkv, B)
  int64_t smem_bytes;           // dynamic shared memory of either kernel
  TensorBox q_res, dout_res;    // dq: q, dout in boxes of 128 rows
  TensorBox k_ring, v_ring;     // dq: k, v in boxes of 64 rows
  TensorBox k_res, v_res;       // dkv: k, v in boxes of 128 rows
  TensorBox q_ring, dout_ring;  // dkv: q, dout in boxes of 64 rows
};

inline const char* bwd_unsupported_reason(const Problem& p, int64_t max_smem) {
  if (const char* why = unsupported_reason(p, max_smem)) return why;
  if (bwd_layout(static_cast<int>(p.D)).bytes > max_smem)
    return "the backward's tiles exceed the device's shared memory";
  return nullptr;
}

constexpr Sm90BwdPlan plan_bwd(const Problem& p) {
  const int d = static_cast<int>(p.D);
  Sm90BwdPlan plan{};
  plan.dq_grid = Grid{(p.T + kBwdResidentRows - 1) / kBwdResidentRows, p.H, p.B};
  plan.dkv_grid = Grid{(p.T + kBwdResidentRows - 1) / kBwdResidentRows, p.Hkv, p.B};
  plan.smem_bytes = bwd_layout(d).bytes;
  plan.q_res = tensor_box(p.total_rows, p.H, p.D, kBwdResidentRows);
  plan.dout_res = plan.q_res;
  plan.k_ring = tensor_box(p.total_rows, p.Hkv, p.D, kBwdRingRows);
  plan.v_ring = plan.k_ring;
  plan.k_res = tensor_box(p.total_rows, p.Hkv, p.D, kBwdResidentRows);
  plan.v_res = plan.k_res;
  plan.q_ring = tensor_box(p.total_rows, p.H, p.D, kBwdRingRows);
  plan.dout_ring = plan.q_ring;
  return plan;
}

}  // namespace moeforge::cuda::flash::sm90
