// Tests runtime/cuda/routing_plan.h, the host-side launch logic of the routing kernels, on the
// CPU: the gating grid and its statistics' shared memory (every row routed by exactly one block,
// the memory within the default limit), the column-sum grid, the counting sort's tiles, scan
// partitions and scratch, and — by replaying the kernels' four steps (tile histograms, per-expert
// tile scan, offsets, warp-wise stable scatter) on the CPU with the plan's numbers — that the
// index map they produce is exactly the CPU moe_plan's and moe_apply_capacity's, with dropped
// copies, k = 1, 2, 8, E up to 4096 and sizes that are not multiples of any tile; and the row
// gathers' vector width and thread counts.
#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "runtime/cuda/routing_plan.h"
#include "runtime/ops.h"
#include "tests/testing.h"

namespace moeforge {
namespace {

using namespace cuda::routing;

TEST(RoutingPlan, GatingWithoutStatisticsTakesOneRowPerWarp) {
  for (const int64_t n : {0, 1, 3, 4, 5, 16383, 16384}) {
    const GatingPlan p = plan_gating(n, 256, false);
    EXPECT_EQ(p.warps, kGatingWarps);
    EXPECT_EQ(p.rows_per_block, kGatingWarps);
    EXPECT_EQ(p.blocks, (n + 3) / 4) << n;
    EXPECT_EQ(p.smem_bytes, 0u);
    EXPECT_EQ(p.partial_rows, 0);
  }
}

TEST(RoutingPlan, GatingKeepsUpTo256ScoresPerRowInRegisters) {
  EXPECT_EQ(gating_lane_values(1), 1);
  EXPECT_EQ(gating_lane_values(32), 1);
  EXPECT_EQ(gating_lane_values(33), 2);
  EXPECT_EQ(gating_lane_values(37), 2);
  EXPECT_EQ(gating_lane_values(64), 2);
  EXPECT_EQ(gating_lane_values(128), 4);
  EXPECT_EQ(gating_lane_values(129), 8);
  EXPECT_EQ(gating_lane_values(256), 8);
  EXPECT_EQ(gating_lane_values(257), 0);
  EXPECT_EQ(gating_lane_values(4096), 0);
}

TEST(RoutingPlan, GatingStatisticsFitSharedMemoryAndCoverEveryRowOnce) {
  EXPECT_EQ(gating_stats_warps(8), 4);
  EXPECT_EQ(gating_stats_warps(256), 4);    // 4 * 8 * 256 + 4 * 256 = 9 KiB
  EXPECT_EQ(gating_stats_warps(1024), 4);   // 36 KiB
  EXPECT_EQ(gating_stats_warps(2048), 2);   // 4 warps would need 72 KiB
  EXPECT_EQ(gating_stats_warps(4096), 1);   // exactly 48 KiB
  EXPECT_EQ(static_cast<size_t>(12 * kGatingMaxStatsExperts), kDefaultSmemBytes);
  for (const int64_t e : {1, 8, 37, 256, 1024, 2048, 3000, 4096})
    for (const int64_t n : {0, 1, 63, 64, 65, 301, 16384, 1000003}) {
      const GatingPlan p = plan_gating(n, e, true);
      SCOPED_TRACE(::testing::Message() << "n=" << n << " e=" << e);
      EXPECT_EQ(p.smem_bytes, static_cast<size_t>(p.warps) * 8 * e + 4 * static_cast<size_t>(e));
      EXPECT_LE(p.smem_bytes, kDefaultSmemBytes);
      EXPECT_GE(p.rows_per_block, kGatingMinRowsPerBlock);
      EXPECT_EQ(p.rows_per_block % p.warps, 0) << "every warp of a full block gets the same number of rows";
      EXPECT_LE(p.blocks, kGatingMaxStatsBlocks);
      EXPECT_EQ(p.partial_rows, p.blocks);
      // Blocks tile [0, n) exactly: the last block starts inside, none starts past the end.
      EXPECT_GE(p.blocks * p.rows_per_block, n);
      if (n > 0) {
        EXPECT_LT((p.blocks - 1) * p.rows_per_block, n);
      } else {
        EXPECT_EQ(p.blocks, 0);
      }
    }
  // A million rows: the grid is capped and every block takes ceil(n / 1024) rows, rounded to warps.
  const GatingPlan big = plan_gating(1000003, 256, true);
  EXPECT_EQ(big.rows_per_block, 980);  // ceil(1000003 / 1024) = 977 -> 980
  EXPECT_EQ(big.blocks, 1021);
}

TEST(RoutingPlan, ColumnSumsCoverEveryRowAndExpert) {
  for (const int64_t e : {1, 128, 129, 256})
    for (const int64_t n : {0, 1, 64, 65, 70000, 2000000}) {
      const ColumnPlan p = plan_column_sums(n, e);
      EXPECT_GE(p.row_blocks * p.rows_per_block, n);
      if (n > 0) {
        EXPECT_LT((p.row_blocks - 1) * p.rows_per_block, n);
      }
      EXPECT_LE(p.row_blocks, kGatingMaxStatsBlocks);
      EXPECT_EQ(p.column_blocks, (e + kColumnThreads - 1) / kColumnThreads);
    }
}

TEST(RoutingPlan, RankTilesScanPartitionsAndScratch) {
  const RankPlan small = plan_ranks(3001 * 2, 8);
  EXPECT_EQ(small.tile, kRankTile);
  EXPECT_EQ(small.tiles, 24);  // 6002 ids in tiles of 256
  EXPECT_EQ(small.scan_partitions, 1);
  EXPECT_EQ(small.scratch_i32, 24 * 8 + 8);
  EXPECT_EQ(small.scatter_warps, kScatterMaxWarps);
  EXPECT_EQ(small.scatter_blocks, 3);
  EXPECT_EQ(plan_ranks(0, 8).tiles, 0);
  EXPECT_EQ(plan_ranks(0, 8).scratch_i32, 8);
  const RankPlan many = plan_ranks(int64_t{1} << 20, 256);
  EXPECT_EQ(many.tiles, 4096);
  EXPECT_EQ(many.scan_partitions, 16);
  const RankPlan huge = plan_ranks(int64_t{8} << 20, 256);  // 1M tokens x 8: tiles grow instead
  EXPECT_EQ(huge.tile, 2048);
  EXPECT_EQ(huge.tiles, kMaxRankTiles);
  const RankPlan wide = plan_ranks(10000, 1000);  // E > 256: tiles of E rounded up to whole warps
  EXPECT_EQ(wide.tile, 1024);
  EXPECT_EQ(wide.tiles, 10);
  for (const int64_t e : {1, 8, 100, 256, 1500, 4096})
    for (const int64_t count : {0, 1, 31, 32, 1023, 1024, 1025, 128 * 1024 + 7, 3000017}) {
      const RankPlan p = plan_ranks(count, e);
      SCOPED_TRACE(::testing::Message() << "count=" << count << " e=" << e);
      EXPECT_EQ(p.tile % kLanes, 0);
      EXPECT_GE(p.tile, e) << "a tile is at least as long as the E prefixes a scatter warp loads";
      EXPECT_LE(p.tiles, kMaxRankTiles);
      EXPECT_GE(p.tiles * p.tile, count);
      if (count > 0) {
        EXPECT_LT((p.tiles - 1) * p.tile, count);
      }
      EXPECT_GE(p.scan_partitions * kScanThreads, p.tiles);
      EXPECT_EQ(p.scratch_i32, std::max<int64_t>(1, p.tiles * e + e));
      EXPECT_EQ(p.hist_smem, 4u * e);
      EXPECT_GE(p.scatter_warps, 1);
      EXPECT_LE(p.scatter_smem, kDefaultSmemBytes);
      EXPECT_GE(p.scatter_blocks * p.scatter_warps, p.tiles);
      if (p.tiles > 0) {
        EXPECT_LT((p.scatter_blocks - 1) * p.scatter_warps, p.tiles);
      }
    }
  EXPECT_EQ(plan_ranks(10, 4096).scatter_warps, 3);  // 48 KiB / 16 KiB of cursors
}

// The kernels' four steps (moe_dispatch.cu), replayed serially with the plan's sizes. ids are
// read with a stride (capacity mode reads one slot of (N, K)); base (E) or, when null, offsets
// (E+1) computed from the totals. capacity < 0: out = the row; else out = id or -1.
void replay_stable_ranks(const int32_t* ids, int64_t count, int64_t stride, int64_t e, const int64_t* base,
                         int64_t* offsets, int64_t capacity, int32_t* out) {
  const RankPlan p = plan_ranks(count, e);
  std::vector<int32_t> scratch(static_cast<size_t>(p.scratch_i32), -99);
  int32_t* hist = scratch.data();
  int32_t* totals = hist + p.tiles * e;
  const auto id_at = [&](int64_t i) {
    const int32_t x = ids[i * stride];
    return x >= 0 && x < e ? x : -1;
  };
  // 1. tile histograms
  for (int64_t t = 0; t < p.tiles; ++t) {
    for (int64_t j = 0; j < e; ++j) hist[t * e + j] = 0;
    for (int64_t i = t * p.tile; i < std::min(count, (t + 1) * p.tile); ++i)
      if (id_at(i) >= 0) ++hist[t * e + id_at(i)];
  }
  // 2. per expert: exclusive scan over the tiles, partition by partition
  for (int64_t j = 0; j < e; ++j) {
    int32_t carry = 0;
    for (int64_t part = 0; part < p.scan_partitions; ++part) {
      int32_t incl = 0;
      for (int64_t t = part * kScanThreads; t < std::min(p.tiles, (part + 1) * kScanThreads); ++t) {
        const int32_t v = hist[t * e + j];
        incl += v;
        hist[t * e + j] = carry + incl - v;
      }
      carry += incl;
    }
    totals[j] = carry;
  }
  // 3. offsets
  if (offsets) {
    offsets[0] = 0;
    for (int64_t j = 0; j < e; ++j) offsets[j + 1] = offsets[j] + totals[j];
    base = offsets;
  }
  // 4. per tile, 32 lanes at a time: a lane's rank is its expert's cursor plus the lanes before
  // it with the same expert; then the cursor moves past the whole group.
  for (int64_t t = 0; t < p.tiles; ++t) {
    std::vector<int32_t> cursor(hist + t * e, hist + (t + 1) * e);
    const int64_t end = std::min(count, (t + 1) * p.tile);
    for (int64_t i0 = t * p.tile; i0 < end; i0 += kLanes) {
      int32_t x[kLanes];
      for (int lane = 0; lane < kLanes; ++lane) x[lane] = i0 + lane < end ? id_at(i0 + lane) : -1;
      int32_t before[kLanes], peers[kLanes], lower[kLanes];
      for (int lane = 0; lane < kLanes; ++lane) {
        before[lane] = x[lane] >= 0 ? cursor[x[lane]] : 0;
        peers[lane] = lower[lane] = 0;
        for (int o = 0; o < kLanes; ++o)
          if (x[o] == x[lane]) {
            ++peers[lane];
            if (o < lane) ++lower[lane];
          }
      }
      for (int lane = 0; lane < kLanes; ++lane)
        if (x[lane] >= 0 && lower[lane] == peers[lane] - 1) cursor[x[lane]] = before[lane] + peers[lane];
      for (int lane = 0; lane < kLanes; ++lane) {
        const int64_t i = i0 + lane;
        if (i >= end) continue;
        if (x[lane] < 0) {
          out[i * stride] = -1;
          continue;
        }
        const int64_t rank = base[x[lane]] + before[lane] + lower[lane];
        out[i * stride] = capacity < 0 ? static_cast<int32_t>(rank) : (rank < capacity ? x[lane] : -1);
      }
    }
  }
}

TEST(RoutingPlan, ReplayedCountingSortIsExactlyTheCpuPlan) {
  for (const int64_t e : {1, 8, 37, 256, 4096})
    for (const int64_t k : {1, 2, 8}) {
      if (k > e) continue;
      for (const int64_t n : {1, 33, 517, 3001}) {
        SCOPED_TRACE(::testing::Message() << "n=" << n << " k=" << k << " e=" << e);
        Tensor experts = testing::random_ints({n, k}, static_cast<uint64_t>(n * 7 + k * 3 + e), 0,
                                              static_cast<int32_t>(e));
        for (int64_t i = 0; i < n * k; i += 5) experts.data<int32_t>()[i] = -1;  // dropped copies
        Tensor positions = Tensor::empty({n, k}, DType::kI32), offsets = Tensor::empty({e + 1}, DType::kI64);
        ops::moe_plan(experts, static_cast<int>(e), positions, offsets);
        std::vector<int32_t> got(static_cast<size_t>(n * k), -777);
        std::vector<int64_t> got_offsets(static_cast<size_t>(e + 1), -777);
        replay_stable_ranks(experts.data<int32_t>(), n * k, 1, e, nullptr, got_offsets.data(), -1, got.data());
        for (int64_t i = 0; i < n * k; ++i) ASSERT_EQ(got[i], positions.data<int32_t>()[i]) << "copy " << i;
        for (int64_t j = 0; j <= e; ++j) ASSERT_EQ(got_offsets[j], offsets.data<int64_t>()[j]) << "offset " << j;
      }
    }
}

TEST(RoutingPlan, ReplayedCountingSortWithTilesGrownPastTheTileLimit) {
  const int64_t n = 150001, k = 8, e = 8;  // 1.2M copies: tiles of 320 ids, not 256
  ASSERT_EQ(plan_ranks(n * k, e).tile, 320);
  Tensor experts = testing::random_ints({n, k}, 99, 0, static_cast<int32_t>(e));
  for (int64_t i = 0; i < n * k; i += 3) experts.data<int32_t>()[i] = -1;
  Tensor positions = Tensor::empty({n, k}, DType::kI32), offsets = Tensor::empty({e + 1}, DType::kI64);
  ops::moe_plan(experts, static_cast<int>(e), positions, offsets);
  std::vector<int32_t> got(static_cast<size_t>(n * k), -777);
  std::vector<int64_t> got_offsets(static_cast<size_t>(e + 1), -777);
  replay_stable_ranks(experts.data<int32_t>(), n * k, 1, e, nullptr, got_offsets.data(), -1, got.data());
  for (int64_t i = 0; i < n * k; ++i) ASSERT_EQ(got[i], positions.data<int32_t>()[i]) << "copy " << i;
  for (int64_t j = 0; j <= e; ++j) ASSERT_EQ(got_offsets[j], offsets.data<int64_t>()[j]) << "offset " << j;
}

TEST(RoutingPlan, ReplayedCountingSortIsExactlyTheCpuCapacityRule) {
  for (const int64_t e : {8, 256})
    for (const int64_t k : {1, 2, 8}) {
      const int64_t n = 2049;
      const Tensor experts = testing::random_ints({n, k}, static_cast<uint64_t>(11 * k + e), 0, static_cast<int32_t>(e));
      Tensor base = Tensor::empty({k, e}, DType::kI64);
      for (int64_t i = 0; i < k * e; ++i) base.data<int64_t>()[i] = i % 5 * 3;
      const int64_t capacity = n / e + 4;  // about one slot's share per expert: some copies overflow
      Tensor dispatch = Tensor::empty({n, k}, DType::kI32);
      ops::moe_apply_capacity(experts, capacity, base, dispatch);
      std::vector<int32_t> got(static_cast<size_t>(n * k), -777);
      for (int64_t j = 0; j < k; ++j)
        replay_stable_ranks(experts.data<int32_t>() + j, n, k, e, base.data<int64_t>() + j * e, nullptr, capacity,
                            got.data() + j);
      int64_t dropped = 0;
      for (int64_t i = 0; i < n * k; ++i) {
        ASSERT_EQ(got[i], dispatch.data<int32_t>()[i]) << "copy " << i << " k=" << k << " e=" << e;
        dropped += got[i] < 0;
      }
      EXPECT_GT(dropped, 0) << "the capacity should drop some copies";
    }
}

TEST(RoutingPlan, RowVectorWidthAndThreads) {
  alignas(16) float buf[16] = {};
  const void* aligned[] = {buf, buf + 4, nullptr};
  const void* misaligned[] = {buf, buf + 1};
  EXPECT_EQ(row_vector_width(4096, aligned, 3), 4);
  EXPECT_EQ(row_vector_width(130, aligned, 3), 1) << "130 floats: rows after the first are not 16-byte aligned";
  EXPECT_EQ(row_vector_width(4096, misaligned, 2), 1);
  EXPECT_EQ(row_vector_width(8, aligned, 0), 4);
  EXPECT_EQ(row_threads(1, 1), 32);
  EXPECT_EQ(row_threads(130, 1), 160);
  EXPECT_EQ(row_threads(130, 4), 64);  // 33 vectors
  EXPECT_EQ(row_threads(4096, 4), kRowMaxThreads);
  EXPECT_EQ(row_threads(8, 4), 32);
}

}  // namespace
}  // namespace moeforge
