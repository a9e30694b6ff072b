// Launch planning of the routing kernels (runtime/cuda/fused_router.cu, router.cu,
// moe_dispatch.cu): block and tile counts, shared-memory bytes, scan partition sizes and the
// vector width of the row gathers. Plain C++, header-only, so that the CPU tests check the very
// arithmetic the launchers use (tests/runtime/test_routing_plan.cpp).
//
// Gating (fused_router.cu). One warp routes one token row at a time. Without statistics a block
// of kGatingWarps warps takes kGatingWarps consecutive rows. With statistics (the aux loss's
// per-expert probability mass and selected-copy counts) block b takes the rows
// [b * rows_per_block, (b + 1) * rows_per_block): its warps accumulate the probabilities of their
// rows per expert in shared memory (one f64 column per warp and expert, rows in a fixed order),
// count selections in shared int32 counters, and write one partial row per block; a second
// kernel adds the partials of all blocks in block order. Nothing depends on timing, so the
// statistics are bitwise reproducible for a given (N, E).
//
// Counting sort (moe_dispatch.cu). The sequence of `count` expert ids is cut into tiles of `tile`
// ids: (1) each tile's histogram (shared-memory integer counters, order-free), (2) per expert an
// exclusive scan of its tile counts in tile order (a block-wide scan in partitions of
// kScanThreads tiles) and the per-expert totals, (3) for the plan, an exclusive scan of the totals
// into offsets, (4) per tile one warp walks the tile 32 ids at a time in order, ranking equal ids
// with __match_any_sync, and hands out base[e] + tile prefix + running count. Every rank is
// exactly the serial counting sort's (runtime/cpu/moe_dispatch.cpp), with or without dropped
// copies (-1).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

namespace moeforge::cuda::routing {

constexpr int kLanes = 32;  // threads of a warp

// Shared memory every target (sm_80, sm_89, sm_90) gives a block without an opt-in.
constexpr size_t kDefaultSmemBytes = 48 * 1024;

// ---- gating ------------------------------------------------------------------------------------
constexpr int kGatingWarps = 4;
// With statistics, a block takes at least this many rows (16 per warp), and the grid at most
// kGatingMaxStatsBlocks blocks: the partial tables stay small (blocks x E) however large N is.
constexpr int64_t kGatingMinRowsPerBlock = 64;
constexpr int64_t kGatingMaxStatsBlocks = 1024;
// The statistics' shared memory (f64 per warp and expert + an int32 counter per expert) must fit
// kDefaultSmemBytes with at least one warp: E <= 48 KiB / 12 bytes.
constexpr int64_t kGatingMaxStatsExperts = 4096;

struct GatingPlan {
  int warps = 0;               // warps per block
  int64_t rows_per_block = 0;  // block b routes rows [b * rows_per_block, min(N, (b + 1) * rows_per_block))
  int64_t blocks = 0;          // grid size (0 when N = 0)
  size_t smem_bytes = 0;       // dynamic shared memory: warps * E doubles, then E int32 (stats only)
  int64_t partial_rows = 0;    // rows of the (blocks, E) partial tables (stats only; else 0)
};

// The warps of a statistics block: as many as fit the default shared memory, at most kGatingWarps.
inline int gating_stats_warps(int64_t e) {
  for (int w = kGatingWarps; w > 1; w /= 2)
    if (static_cast<size_t>(w) * 8 * e + 4 * static_cast<size_t>(e) <= kDefaultSmemBytes) return w;
  return 1;
}

inline GatingPlan plan_gating(int64_t n, int64_t e, bool stats) {
  GatingPlan p;
  if (!stats) {
    p.warps = kGatingWarps;
    p.rows_per_block = kGatingWarps;
    p.blocks = (n + kGatingWarps - 1) / kGatingWarps;
    return p;
  }
  p.warps = gating_stats_warps(e);
  // rows_per_block: at least kGatingMinRowsPerBlock, grown (in whole multiples of the warp count)
  // until the grid has at most kGatingMaxStatsBlocks blocks.
  const int64_t spread = (n + kGatingMaxStatsBlocks - 1) / kGatingMaxStatsBlocks;
  const int64_t rows = std::max(kGatingMinRowsPerBlock, spread);
  p.rows_per_block = (rows + p.warps - 1) / p.warps * p.warps;
  p.blocks = (n + p.rows_per_block - 1) / p.rows_per_block;
  p.smem_bytes = static_cast<size_t>(p.warps) * 8 * e + 4 * static_cast<size_t>(e);
  p.partial_rows = p.blocks;
  return p;
}

// Gate scores each lane keeps in registers: E <= 32 * v for v in {1, 2, 4, 8} (the smallest that
// fits), so that a row is read once and the k argmax rounds scan registers; 0 (the generic path,
// scores re-read from probs) for E > 256.
constexpr int kGatingMaxLaneValues = 8;
inline int gating_lane_values(int64_t e) {
  for (int v = 1; v <= kGatingMaxLaneValues; v *= 2)
    if (e <= int64_t{kLanes} * v) return v;
  return 0;
}

// ---- column sums (router.cu: the aux loss's probability mass from a probs tensor) ------------
// Block (b, g) adds rows [b * rows_per_block, ...) of the expert columns [g * kColumnThreads, ...)
// in row order (one column per thread, f64); a second kernel adds the row blocks in order.
constexpr int kColumnThreads = 128;

struct ColumnPlan {
  int64_t rows_per_block = 0;
  int64_t row_blocks = 0;     // grid.x, and the rows of the (row_blocks, E) f64 partial table
  int64_t column_blocks = 0;  // grid.y
};

inline ColumnPlan plan_column_sums(int64_t n, int64_t e) {
  ColumnPlan p;
  p.rows_per_block = std::max(kGatingMinRowsPerBlock, (n + kGatingMaxStatsBlocks - 1) / kGatingMaxStatsBlocks);
  p.row_blocks = (n + p.rows_per_block - 1) / p.rows_per_block;
  p.column_blocks = (e + kColumnThreads - 1) / kColumnThreads;
  return p;
}

// ---- counting sort -----------------------------------------------------------------------------
// ids per tile (a multiple of kLanes). Small, so that the scatter's serial walk per warp is short
// and many warps share the work; the price is tiles x E scratch and E prefix loads per tile,
// hence a tile is never shorter than E.
constexpr int64_t kRankTile = 256;
// At most this many tiles: beyond it tiles grow, so that the (tiles, E) scratch and the scan's
// strided reads of it stay small next to the ids themselves.
constexpr int64_t kMaxRankTiles = 4096;
constexpr int64_t kMaxRankExperts = 4096;     // int32 counters per expert in shared memory
constexpr int kRankThreads = 256;             // histogram and scan blocks
constexpr int kScanThreads = kRankThreads;    // tiles one scan partition covers
constexpr int kScatterMaxWarps = 8;           // tiles (one per warp) a scatter block walks

struct RankPlan {
  int64_t tile = 0;            // ids per tile, a multiple of kLanes
  int64_t tiles = 0;           // ceil(count / tile)
  int64_t scan_partitions = 0; // partitions of kScanThreads tiles each expert's scan steps through
  int64_t scratch_i32 = 0;     // int32 scratch: tiles * E tile counts (then prefixes) + E totals
  size_t hist_smem = 0;        // histogram block: E int32 counters
  int scatter_warps = 0;       // warps per scatter block, one tile each
  int64_t scatter_blocks = 0;  // ceil(tiles / scatter_warps)
  size_t scatter_smem = 0;     // scatter_warps * E int32 cursors
};

inline RankPlan plan_ranks(int64_t count, int64_t e) {
  RankPlan p;
  // A tile never holds fewer ids than there are experts: each scatter warp first loads E tile
  // prefixes, which should not outweigh the tile's own work.
  const auto whole_warps = [](int64_t x) { return (x + kLanes - 1) / kLanes * kLanes; };
  p.tile = std::max({kRankTile, whole_warps(e), whole_warps((count + kMaxRankTiles - 1) / kMaxRankTiles)});
  p.tiles = (count + p.tile - 1) / p.tile;
  p.scan_partitions = (p.tiles + kScanThreads - 1) / kScanThreads;
  p.scratch_i32 = std::max<int64_t>(1, p.tiles * e + e);
  p.hist_smem = 4 * static_cast<size_t>(e);
  const int64_t fit = static_cast<int64_t>(kDefaultSmemBytes) / std::max<int64_t>(1, 4 * e);
  p.scatter_warps = static_cast<int>(std::clamp<int64_t>(fit, 1, kScatterMaxWarps));
  p.scatter_blocks = (p.tiles + p.scatter_warps - 1) / p.scatter_warps;
  p.scatter_smem = static_cast<size_t>(p.scatter_warps) * 4 * e;
  return p;
}

// ---- row gathers (permute / unpermute) ---------------------------------------------------------
// Rows move as float4 (16 bytes) when every row starts 16-byte aligned: C a multiple of 4 floats
// and every base pointer 16-byte aligned; otherwise as single floats.
inline int row_vector_width(int64_t c, const void* const* ptrs, int count) {
  if (c % 4 != 0) return 1;
  for (int i = 0; i < count; ++i)
    if (ptrs[i] != nullptr && reinterpret_cast<uintptr_t>(ptrs[i]) % 16 != 0) return 1;
  return 4;
}

constexpr int kRowMaxThreads = 256;

// Threads of a block that moves one row of c floats in vectors of `vec`: one vector per thread
// up to kRowMaxThreads, whole warps, at least one warp.
inline int row_threads(int64_t c, int vec) {
  const int64_t vectors = (c + vec - 1) / vec;
  const int64_t warps = (vectors + kLanes - 1) / kLanes;
  return static_cast<int>(std::clamp<int64_t>(warps * kLanes, kLanes, kRowMaxThreads));
}

}  // namespace moeforge::cuda::routing
