// Tests runtime/cuda/attention_plan_sm90.h, the host-side launch logic of the Hopper attention
// forward, on the CPU: tiles and the shared-memory layout (every chunk on a swizzle atom, within
// the H100/H200 opt-in limit), grid sizes and the TMA tensor-map shapes, the reasons the kernel
// declines a problem, the per-tile mask tests against a brute-force scan of the mask, the key
// tiles each consumer warpgroup processes covering every visible pair exactly once, and a replay
// of the shared-memory addressing: where TMA (128-byte swizzle) writes each element of Q, K and V
// against where each wgmma descriptor the kernel builds reads it (PTX ISA canonical layouts);
// the same for the backward's two kernels, whose dk/dv mask test is also checked by brute force.
#include <gtest/gtest.h>

#include <cstdint>
#include <map>
#include <random>
#include <set>
#include <string>

#include "runtime/cuda/attention_plan_sm90.h"

namespace moeforge {
namespace {

using namespace cuda::flash;
using namespace cuda::flash::sm90;

constexpr int64_t kH200Smem = 227 * 1024;

Problem dense(int64_t b, int64_t t, int64_t h, int64_t hkv, int64_t d, int64_t window = 0) {
  return {b, t, h, hkv, d, window, false, b * t};
}

TEST(AttentionPlanSm90, TilesAndSharedMemoryLayout) {
  EXPECT_EQ(kThreads, 384);
  for (int d : {64, 128}) {
    const Tile t = sm90::fwd_tile(d);
    EXPECT_EQ(t.block_q, kConsumerWarpgroups * kRowsPerWarpgroup) << "each consumer warpgroup owns 64 rows";
    EXPECT_EQ(t.block_kv % 16, 0) << "P V steps over keys in k16 slices";
    EXPECT_LE(t.block_kv, 256) << "a TMA box dimension is at most 256";
    EXPECT_LE(t.block_q, 256);
    const SmemLayout l = smem_layout(d);
    for (int64_t off : {l.q, l.k, l.v, l.q_chunk, l.kv_chunk, l.kv_stage})
      EXPECT_EQ(off % kSwizzleAtomBytes, 0) << "D=" << d << ": the 128-byte swizzle needs 1024-byte alignment";
    EXPECT_EQ(l.barriers % 8, 0);
    EXPECT_LE(l.bytes, kH200Smem) << "D=" << d;
    // Registers: 128 x 24 + 256 x 240 within the 64K of a multiprocessor.
    EXPECT_LE(kWarpgroupThreads * kProducerRegs + kConsumerThreads * kConsumerRegs, 65536);
  }
  // Q (128 x 128), 2 stages of K and V (128 x 128 each), 5 barriers, 1024 bytes of alignment slack.
  EXPECT_EQ(smem_layout(128).bytes, 32768 + 2 * 2 * 32768 + 5 * 8 + 1024);
  EXPECT_EQ(smem_layout(64).bytes, 16384 + 2 * 2 * 16384 + 5 * 8 + 1024);
  EXPECT_EQ(smem_layout(128).k, 32768);
  EXPECT_EQ(smem_layout(128).v, 32768 + 2 * 32768);
}

TEST(AttentionPlanSm90, GridAndTensorMaps) {
  const Sm90Plan p = plan_fwd(dense(2, 1000, 8, 2, 128));
  EXPECT_EQ(p.grid.x, 8);  // ceil(1000 / 128)
  EXPECT_EQ(p.grid.y, 8);
  EXPECT_EQ(p.grid.z, 2);
  EXPECT_EQ(p.smem_bytes, smem_layout(128).bytes);
  // q (B T, H, D) as {D, H, rows}; k, v (B T, Hkv, D) as {D, Hkv, rows}; byte strides of dims 1, 2.
  EXPECT_EQ(p.q.dims[0], 128u);
  EXPECT_EQ(p.q.dims[1], 8u);
  EXPECT_EQ(p.q.dims[2], 2000u);
  EXPECT_EQ(p.q.strides[0], 256u);
  EXPECT_EQ(p.q.strides[1], 8u * 128 * 2);
  EXPECT_EQ(p.k.dims[1], 2u);
  EXPECT_EQ(p.k.strides[1], 2u * 128 * 2);
  EXPECT_EQ(p.q.box[0], 64u);
  EXPECT_EQ(p.q.box[1], 1u);
  EXPECT_EQ(p.q.box[2], 128u);
  EXPECT_EQ(p.k.box[2], static_cast<uint32_t>(sm90::fwd_tile(128).block_kv));
  for (const TensorBox* t : {&p.q, &p.k, &p.v}) {
    EXPECT_EQ(t->box[0] * 2, static_cast<uint32_t>(kSwizzleBytes)) << "the box's inner extent is the swizzle span";
    EXPECT_EQ(t->strides[0] % 16, 0u) << "TMA strides are multiples of 16 bytes";
    EXPECT_EQ(t->strides[1] % 16, 0u);
  }
  // The transaction bytes are what the chunk boxes deliver: D / 64 boxes of 64 x rows bf16 each.
  EXPECT_EQ(fwd_q_bytes(128), 2u * p.q.box[0] * p.q.box[2] * 2);
  EXPECT_EQ(fwd_stage_bytes(128), 2u * (2u * p.k.box[0] * p.k.box[2] * 2));
  const Sm90Plan p64 = plan_fwd(dense(1, 64, 4, 4, 64));
  EXPECT_EQ(p64.grid.x, 1);
  EXPECT_EQ(fwd_q_bytes(64), p64.q.box[0] * p64.q.box[2] * 2);
  EXPECT_EQ(fwd_stage_bytes(64), 2u * p64.k.box[0] * p64.k.box[2] * 2);
  // Packed sequences: the rows are the total rows, the grid covers the longest sequence.
  const Sm90Plan pv = plan_fwd(Problem{3, 300, 4, 1, 64, 0, true, 517});
  EXPECT_EQ(pv.q.dims[2], 517u);
  EXPECT_EQ(pv.grid.x, 3);
  EXPECT_EQ(pv.grid.z, 3);
}

TEST(AttentionPlanSm90, UnsupportedReasons) {
  EXPECT_EQ(unsupported_reason(dense(1, 100, 4, 4, 128), kH200Smem), nullptr);
  EXPECT_EQ(unsupported_reason(dense(1, 100, 4, 4, 64), kH200Smem), nullptr);
  EXPECT_EQ(std::string(unsupported_reason(dense(1, 100, 4, 4, 96), kH200Smem)), "head dim is not 64 or 128");
  EXPECT_EQ(std::string(unsupported_reason(dense(1, 100, 4, 4, 128), 99 * 1024)),
            "the tiles exceed the device's shared memory");
  EXPECT_EQ(unsupported_reason(dense(1, 100, 4, 4, 64), 99 * 1024), nullptr);
  EXPECT_EQ(std::string(unsupported_reason(dense(1, int64_t{1} << 31, 1, 1, 64), kH200Smem)),
            "more rows than int32 TMA coordinates address");
  EXPECT_EQ(std::string(unsupported_reason(Problem{1, 1, 1, 1, 64, 0, true, 0}, kH200Smem)), "no rows");
}

// Brute force: some real row of [q_lo, q_lo + rows) fails to see / sees some key of the tile.
struct Scan {
  bool any_hidden = false, any_visible = false;
};
Scan scan(int64_t q_lo, int rows, int64_t k0, int bkv, int64_t len, int64_t w) {
  Scan s;
  for (int64_t i = q_lo; i < q_lo + rows && i < len; ++i)
    for (int64_t j = k0; j < k0 + bkv; ++j) (visible(i, j, len, w) ? s.any_visible : s.any_hidden) = true;
  return s;
}

TEST(AttentionPlanSm90, TileMaskTestsMatchABruteForceScan) {
  std::mt19937 rng(7);
  for (int n = 0; n < 20000; ++n) {
    const int64_t len = 1 + rng() % 700;
    const int64_t w = rng() % 3 == 0 ? 0 : 1 + rng() % 400;
    const int64_t q_lo = int64_t{64} * (rng() % 12);
    const int64_t k0 = int64_t{128} * (rng() % 6);
    const Scan s = scan(q_lo, 64, k0, 128, len, w);
    EXPECT_EQ(tile_needs_mask(q_lo, 64, k0, 128, len, w), s.any_hidden)
        << "q_lo=" << q_lo << " k0=" << k0 << " len=" << len << " w=" << w;
    EXPECT_EQ(tile_visible_any(q_lo, 64, k0, 128, len, w), s.any_visible)
        << "q_lo=" << q_lo << " k0=" << k0 << " len=" << len << " w=" << w;
  }
}

// The block's key tiles (key_tiles over its 128 rows), minus those a warpgroup skips, cover every
// visible (query, key) pair of the warpgroup's rows exactly once.
TEST(AttentionPlanSm90, WarpgroupsCoverEveryVisiblePairOnce) {
  const Tile t = sm90::fwd_tile(128);
  for (const int64_t len : {1, 63, 64, 65, 127, 128, 129, 300, 513})
    for (const int64_t w : {0, 1, 17, 64, 100, 128, 200}) {
      std::map<std::pair<int64_t, int64_t>, int> seen;
      for (int64_t q0 = 0; q0 < len; q0 += t.block_q) {
        const TileRange kt = key_tiles(q0, t.block_q, t.block_kv, len, w);
        for (int cw = 0; cw < kConsumerWarpgroups; ++cw) {
          const int64_t q_lo = q0 + cw * kRowsPerWarpgroup;
          for (int64_t j = kt.first; j < kt.last; ++j) {
            const int64_t k0 = j * t.block_kv;
            if (!tile_visible_any(q_lo, kRowsPerWarpgroup, k0, t.block_kv, len, w)) continue;
            for (int64_t i = q_lo; i < q_lo + kRowsPerWarpgroup && i < len; ++i)
              for (int64_t k = k0; k < k0 + t.block_kv; ++k)
                if (visible(i, k, len, w)) ++seen[{i, k}];
          }
        }
      }
      int64_t pairs = 0;
      for (int64_t i = 0; i < len; ++i)
        for (int64_t k = 0; k < len; ++k)
          if (visible(i, k, len, w)) {
            ++pairs;
            EXPECT_EQ((seen[{i, k}]), 1) << "len=" << len << " w=" << w << " i=" << i << " k=" << k;
          }
      EXPECT_EQ(static_cast<int64_t>(seen.size()), pairs) << "len=" << len << " w=" << w;
    }
}

// The 128-byte swizzle as the hardware applies it to a shared-memory byte address: the 16-byte
// unit (bits 4-6) is XORed with the row within the 1024-byte atom (bits 7-9). Offsets here are
// from the kernel's 1024-byte-aligned base, so relative and absolute addresses swizzle alike.
int64_t sw128(int64_t addr) { return addr ^ (((addr >> 7) & 7) << 4); }

// Where TMA puts element (row, col) of a box of 64 columns written at `dst` (rows of 128 bytes).
int64_t tma_at(int64_t dst, int64_t row, int64_t col) { return sw128(dst + row * 128 + col * 2); }

// Where a wgmma reads element (mn, k) of a K-major operand (A: m, k; B: n, k) with start address
// `start`, SBO = 1024: ((8,m),(T,2)) : ((8T,SBO),(1,T)) in 16-byte units, then swizzled.
int64_t kmajor_at(int64_t start, int64_t mn, int64_t k) { return sw128(start + mn / 8 * 1024 + mn % 8 * 128 + k * 2); }

// Where a wgmma reads element (k, n), n < 64, of an MN-major B: ((T,8,m),(8,k)) : ((1,T,LBO),(8T,SBO)).
int64_t mnmajor_at(int64_t start, int64_t k, int64_t n) { return sw128(start + k / 8 * 1024 + k % 8 * 128 + n * 2); }

TEST(AttentionPlanSm90, WgmmaDescriptorsReadWhatTmaWrote) {
  for (const int d : {64, 128}) {
    const Tile t = sm90::fwd_tile(d);
    const SmemLayout l = smem_layout(d);
    // S = Q Kᵀ: A = Q rows of warpgroup cw, B = K rows (the n of S), k-step ks over head-dim columns.
    for (int cw = 0; cw < kConsumerWarpgroups; ++cw)
      for (int ks = 0; ks < d / 16; ++ks)
        for (int m = 0; m < kRowsPerWarpgroup; ++m)
          for (int k = 0; k < 16; ++k) {
            const int row = cw * kRowsPerWarpgroup + m, col = ks * 16 + k;
            ASSERT_EQ(kmajor_at(q_operand_at(d, cw, ks), m, k), tma_at(q_chunk_at(d, col / 64), row, col % 64))
                << "Q D=" << d << " cw=" << cw << " ks=" << ks << " m=" << m << " k=" << k;
          }
    for (int s = 0; s < kStages; ++s) {
      for (int ks = 0; ks < d / 16; ++ks)
        for (int n = 0; n < t.block_kv; ++n)
          for (int k = 0; k < 16; ++k) {
            const int col = ks * 16 + k;
            ASSERT_EQ(kmajor_at(k_operand_at(d, s, ks), n, k), tma_at(k_chunk_at(d, s, col / 64), n, col % 64))
                << "K D=" << d << " stage=" << s << " ks=" << ks << " n=" << n << " k=" << k;
          }
      // O += P V: B = V with keys as k (16 per step kj) and head-dim columns as n (64 per chunk c).
      for (int kj = 0; kj < t.block_kv / 16; ++kj)
        for (int c = 0; c < d / 64; ++c)
          for (int k = 0; k < 16; ++k)
            for (int n = 0; n < 64; ++n)
              ASSERT_EQ(mnmajor_at(v_operand_at(d, s, kj, c), k, n), tma_at(v_chunk_at(d, s, c), kj * 16 + k, n))
                  << "V D=" << d << " stage=" << s << " kj=" << kj << " c=" << c << " k=" << k << " n=" << n;
    }
    // The TMA boxes tile the buffers without overlap, and all of it lies below the barriers.
    std::set<int64_t> bytes;
    const auto box = [&](int64_t dst, int rows) {
      for (int r = 0; r < rows; ++r)
        for (int c = 0; c < 64; ++c) {
          const int64_t at = tma_at(dst, r, c);
          ASSERT_TRUE(bytes.insert(at).second) << "D=" << d << " byte " << at << " written twice";
          ASSERT_LT(at + 1, l.barriers);
        }
    };
    for (int c = 0; c < d / 64; ++c) {
      box(q_chunk_at(d, c), t.block_q);
      for (int s = 0; s < kStages; ++s) {
        box(k_chunk_at(d, s, c), t.block_kv);
        box(v_chunk_at(d, s, c), t.block_kv);
      }
    }
    EXPECT_EQ(static_cast<int64_t>(bytes.size()) * 2, l.barriers) << "D=" << d << ": every byte written once";
  }
}

// ---- backward ----

TEST(AttentionPlanSm90, BackwardLayoutGridsAndTensorMaps) {
  for (int d : {64, 128}) {
    const BwdLayout l = bwd_layout(d);
    for (int64_t off : {l.resident, l.ring, l.resident_chunk, l.resident_tile, l.ring_chunk, l.ring_tile, l.ring_stage})
      EXPECT_EQ(off % kSwizzleAtomBytes, 0) << "D=" << d;
    EXPECT_LE(l.bytes, kH200Smem) << "D=" << d;
  }
  // Two resident tiles of 128 x 128, two stages of two ring tiles of 64 x 128, barriers, slack.
  EXPECT_EQ(bwd_layout(128).bytes, 2 * 32768 + 2 * 2 * 16384 + 5 * 8 + 1024);
  EXPECT_EQ(bwd_layout(64).bytes, 2 * 16384 + 2 * 2 * 8192 + 5 * 8 + 1024);
  const Sm90BwdPlan p = plan_bwd(dense(2, 1000, 8, 2, 128));
  EXPECT_EQ(p.dq_grid.x, 8);  // ceil(1000 / 128) query tiles
  EXPECT_EQ(p.dq_grid.y, 8);
  EXPECT_EQ(p.dkv_grid.x, 8);  // ceil(1000 / 128) key tiles
  EXPECT_EQ(p.dkv_grid.y, 2);  // one block per kv head: it loops over the group's query heads
  EXPECT_EQ(p.dkv_grid.z, 2);
  EXPECT_EQ(p.q_res.box[2], 128u);
  EXPECT_EQ(p.q_res.dims[1], 8u);
  EXPECT_EQ(p.k_ring.box[2], 64u);
  EXPECT_EQ(p.k_ring.dims[1], 2u);
  EXPECT_EQ(p.k_res.box[2], 128u);
  EXPECT_EQ(p.q_ring.box[2], 64u);
  EXPECT_EQ(p.dout_ring.dims[1], 8u);
  // Transaction bytes: what the D / 64 chunk boxes of the two tiles deliver.
  EXPECT_EQ(bwd_resident_bytes(128), 2u * 2 * (p.q_res.box[0] * p.q_res.box[2] * 2));
  EXPECT_EQ(bwd_stage_bytes(128), 2u * 2 * (p.k_ring.box[0] * p.k_ring.box[2] * 2));
  EXPECT_EQ(bwd_stage_bytes(64), 2u * (p.k_ring.box[0] * p.k_ring.box[2] * 2));
  EXPECT_EQ(bwd_unsupported_reason(dense(1, 100, 4, 4, 128), kH200Smem), nullptr);
  EXPECT_EQ(std::string(bwd_unsupported_reason(dense(1, 100, 4, 4, 128), 99 * 1024)),
            "the tiles exceed the device's shared memory");
}

TEST(AttentionPlanSm90, DkvMaskTestMatchesABruteForceScan) {
  std::mt19937 rng(11);
  for (int n = 0; n < 20000; ++n) {
    const int64_t len = 1 + rng() % 700;
    const int64_t w = rng() % 3 == 0 ? 0 : 1 + rng() % 400;
    const int64_t q0 = int64_t{64} * (rng() % 12);
    const int64_t k_lo = int64_t{64} * (rng() % 12);
    bool all_visible = true;
    for (int64_t i = q0; i < q0 + 64; ++i)
      for (int64_t j = k_lo; j < k_lo + 64; ++j) all_visible = all_visible && visible(i, j, len, w);
    EXPECT_EQ(dkv_tile_needs_mask(q0, 64, k_lo, 64, len, w), !all_visible)
        << "q0=" << q0 << " k_lo=" << k_lo << " len=" << len << " w=" << w;
  }
}

// Both backward kernels visit every visible (query, key) pair exactly once per query head: dq over
// the key tiles of its 128 queries, dkv over the query tiles of its 128 keys, each warpgroup
// skipping the tiles none of its rows sees.
TEST(AttentionPlanSm90, BackwardTilesCoverEveryVisiblePairOnce) {
  constexpr int kR = kBwdResidentRows, kC = kBwdRingRows, kW = kRowsPerWarpgroup;
  for (const int64_t len : {1, 63, 64, 65, 127, 128, 129, 300, 513})
    for (const int64_t w : {0, 1, 17, 64, 100, 128, 200}) {
      std::map<std::pair<int64_t, int64_t>, int> dq_seen, dkv_seen;
      for (int64_t q0 = 0; q0 < len; q0 += kR) {
        const TileRange kt = key_tiles(q0, kR, kC, len, w);
        for (int cw = 0; cw < kConsumerWarpgroups; ++cw)
          for (int64_t j = kt.first; j < kt.last; ++j) {
            const int64_t q_lo = q0 + cw * kW, k0 = j * kC;
            if (!tile_visible_any(q_lo, kW, k0, kC, len, w)) continue;
            for (int64_t i = q_lo; i < q_lo + kW && i < len; ++i)
              for (int64_t k = k0; k < k0 + kC; ++k)
                if (visible(i, k, len, w)) ++dq_seen[{i, k}];
          }
      }
      for (int64_t k0 = 0; k0 < len; k0 += kR) {
        const TileRange qt = query_tiles(k0, kC, kR, len, w);
        for (int cw = 0; cw < kConsumerWarpgroups; ++cw)
          for (int64_t t = qt.first; t < qt.last; ++t) {
            const int64_t k_lo = k0 + cw * kW, q0 = t * kC;
            if (!tile_visible_any(q0, kC, k_lo, kW, len, w)) continue;
            for (int64_t i = q0; i < q0 + kC; ++i)
              for (int64_t k = k_lo; k < k_lo + kW && k < len; ++k)
                if (visible(i, k, len, w)) ++dkv_seen[{i, k}];
          }
      }
      int64_t pairs = 0;
      for (int64_t i = 0; i < len; ++i)
        for (int64_t k = 0; k < len; ++k)
          if (visible(i, k, len, w)) {
            ++pairs;
            ASSERT_EQ((dq_seen[{i, k}]), 1) << "dq len=" << len << " w=" << w << " i=" << i << " k=" << k;
            ASSERT_EQ((dkv_seen[{i, k}]), 1) << "dkv len=" << len << " w=" << w << " i=" << i << " k=" << k;
          }
      EXPECT_EQ(static_cast<int64_t>(dq_seen.size()), pairs);
      EXPECT_EQ(static_cast<int64_t>(dkv_seen.size()), pairs);
    }
}

TEST(AttentionPlanSm90, BackwardDescriptorsReadWhatTmaWrote) {
  for (const int d : {64, 128}) {
    const BwdLayout l = bwd_layout(d);
    // Resident tiles as the K-major A of warpgroup cw (S = Q Kᵀ and dP = dO Vᵀ; Sᵀ = K Qᵀ, dPᵀ = V dOᵀ).
    for (int r = 0; r < 2; ++r)
      for (int cw = 0; cw < kConsumerWarpgroups; ++cw)
        for (int ks = 0; ks < d / 16; ++ks)
          for (int m = 0; m < kRowsPerWarpgroup; ++m)
            for (int k = 0; k < 16; ++k) {
              const int row = cw * kRowsPerWarpgroup + m, col = ks * 16 + k;
              ASSERT_EQ(kmajor_at(resident_operand_at(d, r, cw, ks), m, k),
                        tma_at(resident_chunk_at(d, r, col / 64), row, col % 64))
                  << "resident " << r << " D=" << d << " cw=" << cw << " ks=" << ks << " m=" << m << " k=" << k;
            }
    for (int x = 0; x < 2; ++x)
      for (int s = 0; s < kStages; ++s) {
        // Ring tiles as the K-major B of those products (their 64 rows are N).
        for (int ks = 0; ks < d / 16; ++ks)
          for (int n = 0; n < kBwdRingRows; ++n)
            for (int k = 0; k < 16; ++k) {
              const int col = ks * 16 + k;
              ASSERT_EQ(kmajor_at(ring_operand_at(d, x, s, ks), n, k),
                        tma_at(ring_chunk_at(d, x, s, col / 64), n, col % 64))
                  << "ring " << x << " D=" << d << " stage=" << s << " ks=" << ks << " n=" << n << " k=" << k;
            }
        // Ring tiles as the MN-major B of the accumulations (dQ += dS K, dV += Pᵀ dO, dK += dSᵀ Q).
        for (int kj = 0; kj < kBwdRingRows / 16; ++kj)
          for (int c = 0; c < d / 64; ++c)
            for (int k = 0; k < 16; ++k)
              for (int n = 0; n < 64; ++n)
                ASSERT_EQ(mnmajor_at(ring_mn_operand_at(d, x, s, kj, c), k, n),
                          tma_at(ring_chunk_at(d, x, s, c), kj * 16 + k, n))
                    << "ring " << x << " D=" << d << " stage=" << s << " kj=" << kj << " c=" << c;
      }
    std::set<int64_t> bytes;
    const auto box = [&](int64_t dst, int rows) {
      for (int r = 0; r < rows; ++r)
        for (int c = 0; c < 64; ++c) {
          const int64_t at = tma_at(dst, r, c);
          ASSERT_TRUE(bytes.insert(at).second) << "D=" << d << " byte " << at << " written twice";
          ASSERT_LT(at + 1, l.barriers);
        }
    };
    for (int c = 0; c < d / 64; ++c) {
      for (int r = 0; r < 2; ++r) box(resident_chunk_at(d, r, c), kBwdResidentRows);
      for (int x = 0; x < 2; ++x)
        for (int s = 0; s < kStages; ++s) box(ring_chunk_at(d, x, s, c), kBwdRingRows);
    }
    EXPECT_EQ(static_cast<int64_t>(bytes.size()) * 2, l.barriers) << "D=" << d << ": every byte written once";
  }
}

}  // namespace
}  // namespace moeforge
