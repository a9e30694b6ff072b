// CPU kernels of causal grouped-query attention (contracts in runtime/ops.h; arguments arrive
// validated).
//
// The algorithm is FlashAttention-2 (Dao, 2023) on kTile x kTile tiles: the forward keeps a
// running row max and row sum per query row (online softmax) and rescales its output
// accumulator, so no T x T matrix ever exists; it saves lse for the backward, which rebuilds each
// probability tile as exp(scale * q k^T - lse). Per-thread scratch is a few tiles.
//
// Threads: the forward runs (b, h, query tile) items in parallel; the backward runs (b, kv head)
// items, so each thread owns the dk/dv rows of its kv head and the dq rows of the query heads of
// its group, and accumulates them in a fixed order: results are deterministic and independent of
// the thread count. Tile products are single-threaded cblas_sgemm calls on strided views of the
// (B, T, H, D) tensors.
#pragma once

// Masks (ops::AttentionMask): query i of a row sees keys [first_i, i], first_i the later of its
// document's start and i - window + 1; key tiles wholly before first of a query tile's first row
// are skipped (first_i does not decrease along a row).
#include "runtime/ops.h"
#include "runtime/tensor.h"

namespace moeforge::cpu {

void attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v, float scale, const Tensor& out,
                   const Tensor& lse, const ops::AttentionMask& mask);
void attention_bwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                   const Tensor& dout, float scale, const Tensor& dq, const Tensor& dk, const Tensor& dv,
                   const ops::AttentionMask& mask);

}  // namespace moeforge::cpu
