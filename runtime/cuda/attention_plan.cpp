// Launch planning of the fused attention kernels (see attention_plan.h).
#include "runtime/cuda/attention_plan.h"

#include "runtime/error.h"

namespace moeforge::cuda::flash {
namespace {

constexpr int64_t kMaxGridY = 65535, kMaxGridZ = 65535, kMaxGridX = (int64_t{1} << 31) - 1;

Grid checked_grid(const Problem& p, const char* kernel, Grid g) {
  MOE_CHECK(g.x <= kMaxGridX && g.y <= kMaxGridY && g.z <= kMaxGridZ,
            "flash attention ({}): grid ({}, {}, {}) exceeds the CUDA limits for B={} T={} H={} Hkv={}", kernel, g.x,
            g.y, g.z, p.B, p.T, p.H, p.Hkv);
  return g;
}

KernelPlan kernel_plan(const Problem& p, const char* kernel, Tile tile, int64_t tile_rows_per_head, int64_t heads,
                       int64_t staged_rows, int64_t floats, int64_t max_smem) {
  const int64_t smem = tile_smem_bytes(staged_rows, p.D, floats);
  MOE_CHECK(smem <= max_smem, "flash attention ({}): {} bytes of shared memory for D={} exceed the device's {}",
            kernel, smem, p.D, max_smem);
  return {tile, checked_grid(p, kernel, Grid{(p.T + tile_rows_per_head - 1) / tile_rows_per_head, heads, p.B}), smem};
}

}  // namespace

int64_t tile_smem_bytes(int64_t rows, int64_t d, int64_t floats) {
  return rows * (d + kSmemPad) * 2 + floats * 4;
}

Plan plan_flash_attention(const Problem& p, int64_t max_smem) {
  MOE_CHECK(supported_head_dim(p.D), "flash attention: head dim {} is not supported (64 or 128)", p.D);
  MOE_CHECK(p.B > 0 && p.T > 0 && p.H > 0 && p.Hkv > 0,
            "flash attention: B={} T={} H={} Hkv={} must all be positive", p.B, p.T, p.H, p.Hkv);
  MOE_CHECK(p.H % p.Hkv == 0, "flash attention: H={} is not a multiple of Hkv={}", p.H, p.Hkv);
  MOE_CHECK(p.window >= 0, "flash attention: window {} must be >= 0 (0: no window)", p.window);
  MOE_CHECK(p.varlen ? p.total_rows >= 0 : p.total_rows == p.B * p.T,
            "flash attention: {} total rows for B={} T={} ({})", p.total_rows, p.B, p.T,
            p.varlen ? "varlen" : "dense: must be B * T");
  const int d = static_cast<int>(p.D);
  Plan plan{};
  // Forward: Q, K and V tiles staged.
  const Tile f = fwd_tile(d);
  plan.fwd = kernel_plan(p, "forward", f, f.block_q, p.H, f.block_q + 2 * f.block_kv, 0, max_smem);
  // dq: Q and dO tiles, K and V tiles.
  const Tile q = dq_tile(d);
  plan.dq = kernel_plan(p, "dq", q, q.block_q, p.H, 2 * q.block_q + 2 * q.block_kv, 0, max_smem);
  // dk, dv: K and V tiles, Q and dO tiles, and the query tile's lse and delta.
  const Tile kv = dkv_tile(d);
  plan.dkv = kernel_plan(p, "dk/dv", kv, kv.block_kv, p.Hkv, 2 * kv.block_kv + 2 * kv.block_q, 2 * kv.block_q,
                         max_smem);
  plan.delta_rows = p.total_rows * p.H;
  return plan;
}

}  // namespace moeforge::cuda::flash
