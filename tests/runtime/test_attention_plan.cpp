// Tests runtime/cuda/attention_plan.{h,cpp}, the host-side launch logic of the fused attention,
// on the CPU: tile sizes and shared-memory bytes per head dim, grid sizes, the key/query tile
// ranges of the causal and sliding-window masks (against a brute-force scan of the mask: every
// visible pair covered, no tile visited in vain), the forward/backward tile schedules covering
// each visible (query, key) pair exactly once, the reversed tile order, and the errors.
#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <vector>

#include "runtime/cuda/attention_plan.h"
#include "tests/testing.h"

namespace moeforge {
namespace {

using namespace cuda::flash;

constexpr int64_t kH200Smem = 227 * 1024;

Problem dense(int64_t b, int64_t t, int64_t h, int64_t hkv, int64_t d, int64_t window = 0) {
  return {b, t, h, hkv, d, window, false, b * t};
}

TEST(AttentionPlan, TilesAndSharedMemoryPerHeadDim) {
  EXPECT_EQ(fwd_tile(64).block_q, 64);
  EXPECT_EQ(fwd_tile(64).block_kv, 64);
  EXPECT_EQ(fwd_tile(128).block_q, 64);
  EXPECT_EQ(fwd_tile(128).block_kv, 32);
  EXPECT_EQ(dkv_tile(128).block_q, 32);
  EXPECT_EQ(dkv_tile(128).block_kv, 64);
  // Each warp owns 16 rows of the tile its block is built around.
  for (int d : {64, 128}) {
    EXPECT_EQ(fwd_tile(d).block_q, kFlashWarps * kRowsPerWarp);
    EXPECT_EQ(dq_tile(d).block_q, kFlashWarps * kRowsPerWarp);
    EXPECT_EQ(dkv_tile(d).block_kv, kFlashWarps * kRowsPerWarp);
    EXPECT_EQ(fwd_tile(d).block_kv % 16, 0) << "P V steps over keys in k16 slices";
    EXPECT_EQ(dkv_tile(d).block_q % 16, 0) << "dV += Pᵀ dO steps over queries in k16 slices";
  }
  const Plan p128 = plan_flash_attention(dense(1, 100, 4, 4, 128), kH200Smem);
  EXPECT_EQ(p128.fwd.smem_bytes, (64 + 2 * 32) * 136 * 2);               // Q, K, V: 34816
  EXPECT_EQ(p128.dq.smem_bytes, (2 * 64 + 2 * 32) * 136 * 2);            // Q, dO, K, V: 52224
  EXPECT_EQ(p128.dkv.smem_bytes, (2 * 64 + 2 * 32) * 136 * 2 + 2 * 32 * 4);  // + lse, delta
  const Plan p64 = plan_flash_attention(dense(1, 100, 4, 4, 64), kH200Smem);
  EXPECT_EQ(p64.fwd.smem_bytes, 3 * 64 * 72 * 2);
  EXPECT_EQ(p64.dq.smem_bytes, 4 * 64 * 72 * 2);
  EXPECT_EQ(p64.dkv.smem_bytes, 4 * 64 * 72 * 2 + 2 * 64 * 4);
  // Every plan fits sm_89's 99 KiB opt-in limit (RTX 40xx), the smallest of the three targets.
  EXPECT_NO_THROW(plan_flash_attention(dense(1, 100, 4, 4, 128), 99 * 1024));
}

TEST(AttentionPlan, GridSizes) {
  const Plan p = plan_flash_attention(dense(2, 1000, 8, 2, 128), kH200Smem);
  EXPECT_EQ(p.fwd.grid.x, 16);  // ceil(1000 / 64) query tiles
  EXPECT_EQ(p.fwd.grid.y, 8);
  EXPECT_EQ(p.fwd.grid.z, 2);
  EXPECT_EQ(p.dq.grid.x, 16);
  EXPECT_EQ(p.dkv.grid.x, 16);  // ceil(1000 / 64) key tiles
  EXPECT_EQ(p.dkv.grid.y, 2);   // one block per kv head: it loops over the group's query heads
  EXPECT_EQ(p.dkv.grid.z, 2);
  EXPECT_EQ(p.delta_rows, 2 * 1000 * 8);

  // Packed sequences: one grid row per sequence, tiles for the longest.
  const Plan v = plan_flash_attention(Problem{3, 130, 4, 1, 64, 0, true, 200}, kH200Smem);
  EXPECT_EQ(v.fwd.grid.x, 3);
  EXPECT_EQ(v.fwd.grid.z, 3);
  EXPECT_EQ(v.dkv.grid.y, 1);
  EXPECT_EQ(v.delta_rows, 200 * 4);
}

TEST(AttentionPlan, ReversedTileOrderIsAPermutation) {
  for (int64_t n : {1, 2, 7}) {
    std::vector<int> seen(n, 0);
    for (int64_t x = 0; x < n; ++x) ++seen[tile_of_block(x, n)];
    for (int64_t i = 0; i < n; ++i) EXPECT_EQ(seen[i], 1) << "n=" << n << " tile " << i;
    EXPECT_EQ(tile_of_block(0, n), n - 1) << "the longest causal tile goes first";
  }
}

// Brute force: the key tiles that hold a key visible to some query of [q0, q0 + bq) must be
// exactly key_tiles(...), and symmetrically for query_tiles.
TEST(AttentionPlan, TileRangesMatchTheMask) {
  for (int64_t len : {1, 15, 16, 17, 64, 100, 131}) {
    for (int64_t w : {0, 1, 5, 16, 33, 200}) {
      for (const Tile tile : {Tile{64, 64}, Tile{64, 32}, Tile{32, 64}, Tile{16, 48}}) {
        const int bq = tile.block_q, bkv = tile.block_kv;
        for (int64_t q0 = 0; q0 < len; q0 += bq) {
          int64_t first = -1, last = -1;
          for (int64_t i = q0; i < q0 + bq; ++i)
            for (int64_t j = 0; j < len; ++j)
              if (visible(i, j, len, w)) {
                if (first < 0 || j / bkv < first) first = j / bkv;
                last = std::max(last, j / bkv + 1);
              }
          const TileRange r = key_tiles(q0, bq, bkv, len, w);
          EXPECT_EQ(r.first, first) << "len " << len << " w " << w << " q0 " << q0 << " bkv " << bkv;
          EXPECT_EQ(r.last, last) << "len " << len << " w " << w << " q0 " << q0 << " bkv " << bkv;
        }
        for (int64_t k0 = 0; k0 < len; k0 += bkv) {
          int64_t first = -1, last = -1;
          for (int64_t j = k0; j < k0 + bkv; ++j)
            for (int64_t i = 0; i < len; ++i)
              if (visible(i, j, len, w)) {
                if (first < 0 || i / bq < first) first = i / bq;
                last = std::max(last, i / bq + 1);
              }
          const TileRange r = query_tiles(k0, bq, bkv, len, w);
          EXPECT_EQ(r.first, first) << "len " << len << " w " << w << " k0 " << k0 << " bq " << bq;
          EXPECT_EQ(r.last, last) << "len " << len << " w " << w << " k0 " << k0 << " bq " << bq;
        }
      }
    }
  }
}

// The schedules the kernels run, replayed on the CPU over a planned grid: the forward (and dq)
// visit each visible (query, key) pair exactly once, the dk/dv kernel once per query head of the
// group, and never a pair outside the sequence.
TEST(AttentionPlan, SchedulesCoverEachVisiblePairOnce) {
  for (const int64_t d : {64, 128}) {
    for (const int64_t w : {0, 7, 40}) {
      const Problem prob = dense(1, 77, 4, 2, d, w);
      const Plan plan = plan_flash_attention(prob, kH200Smem);
      const int64_t len = prob.T;
      std::vector<int> fwd(len * len, 0), dkv(len * len, 0);
      for (int64_t bx = 0; bx < plan.fwd.grid.x; ++bx) {
        const int64_t q0 = tile_of_block(bx, plan.fwd.grid.x) * plan.fwd.tile.block_q;
        if (q0 >= len) continue;
        const TileRange r = key_tiles(q0, plan.fwd.tile.block_q, plan.fwd.tile.block_kv, len, w);
        for (int64_t j = r.first; j < r.last; ++j)
          for (int64_t i = q0; i < std::min(len, q0 + plan.fwd.tile.block_q); ++i)
            for (int64_t kj = j * plan.fwd.tile.block_kv; kj < std::min(len, (j + 1) * plan.fwd.tile.block_kv); ++kj)
              if (visible(i, kj, len, w)) ++fwd[i * len + kj];
      }
      const int64_t group = prob.H / prob.Hkv;
      for (int64_t bx = 0; bx < plan.dkv.grid.x; ++bx) {
        const int64_t k0 = tile_of_block(bx, plan.dkv.grid.x) * plan.dkv.tile.block_kv;
        if (k0 >= len) continue;
        const TileRange r = query_tiles(k0, plan.dkv.tile.block_q, plan.dkv.tile.block_kv, len, w);
        for (int64_t h = 0; h < group; ++h)
          for (int64_t it = r.first; it < r.last; ++it)
            for (int64_t i = it * plan.dkv.tile.block_q; i < std::min(len, (it + 1) * plan.dkv.tile.block_q); ++i)
              for (int64_t kj = k0; kj < std::min(len, k0 + plan.dkv.tile.block_kv); ++kj)
                if (visible(i, kj, len, w)) ++dkv[i * len + kj];
      }
      for (int64_t i = 0; i < len; ++i)
        for (int64_t j = 0; j < len; ++j) {
          const bool vis = j <= i && (w == 0 || i - j < w);
          ASSERT_EQ(fwd[i * len + j], vis ? 1 : 0) << "D " << d << " w " << w << " (" << i << ", " << j << ")";
          ASSERT_EQ(dkv[i * len + j], vis ? group : 0) << "D " << d << " w " << w << " (" << i << ", " << j << ")";
        }
    }
  }
}

TEST(AttentionPlan, VisibleIsTheCausalSlidingWindowMask) {
  EXPECT_TRUE(visible(5, 5, 10, 0));
  EXPECT_TRUE(visible(5, 0, 10, 0));
  EXPECT_FALSE(visible(5, 6, 10, 0));
  EXPECT_FALSE(visible(10, 3, 10, 0)) << "a query past the sequence sees nothing";
  EXPECT_TRUE(visible(5, 3, 10, 3));   // i - j = 2 < 3
  EXPECT_FALSE(visible(5, 2, 10, 3));  // i - j = 3
  EXPECT_TRUE(visible(5, 5, 10, 1)) << "window 1: only the token itself";
}

TEST(AttentionPlan, Errors) {
  EXPECT_EQ(testing::error_of([] { plan_flash_attention(dense(1, 8, 2, 2, 96), kH200Smem); }),
            "flash attention: head dim 96 is not supported (64 or 128)");
  EXPECT_EQ(testing::error_of([] { plan_flash_attention(dense(1, 8, 6, 4, 64), kH200Smem); }),
            "flash attention: H=6 is not a multiple of Hkv=4");
  EXPECT_EQ(testing::error_of([] { plan_flash_attention(dense(1, 0, 2, 2, 64), kH200Smem); }),
            "flash attention: B=1 T=0 H=2 Hkv=2 must all be positive");
  EXPECT_EQ(testing::error_of([] { plan_flash_attention(dense(1, 8, 2, 2, 64, -1), kH200Smem); }),
            "flash attention: window -1 must be >= 0 (0: no window)");
  EXPECT_EQ(testing::error_of([] { plan_flash_attention(Problem{2, 8, 2, 2, 64, 0, false, 15}, kH200Smem); }),
            "flash attention: 15 total rows for B=2 T=8 (dense: must be B * T)");
  // sm_80's default 48 KiB without the opt-in is too little for the dq kernel at D = 128.
  EXPECT_EQ(testing::error_of([] { plan_flash_attention(dense(1, 8, 2, 2, 128), 48 * 1024); }),
            "flash attention (dq): 52224 bytes of shared memory for D=128 exceed the device's 49152");
  EXPECT_EQ(testing::error_of([] { plan_flash_attention(dense(1, 8, 70000, 70000, 64), kH200Smem); }),
            "flash attention (forward): grid (1, 70000, 1) exceeds the CUDA limits for B=1 T=8 H=70000 Hkv=70000");
}

}  // namespace
}  // namespace moeforge
