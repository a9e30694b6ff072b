// CPU kernels of the MoE routing ops (see runtime/ops.h for the contracts): router top-k and its
// losses (router.cpp), the dispatch plan and the permute/unpermute gathers (moe_dispatch.cpp), and
// the grouped expert GEMM (grouped_gemm.cpp).
//
// Shapes, dtypes and devices arrive validated by runtime/ops_moe.cpp. What only the data can
// reveal is checked here, in a serial pass before the parallel work so the error is the first
// bad element and never thrown from inside an OpenMP region: expert ids in [0, E) (-1 allowed
// where a copy may be dropped), kept positions a permutation of [0, M) (or in range, for the
// gathers), offsets well formed.
//
// Threads: OpenMP over tokens (rows) or over (expert, tile) GEMM tasks; each output element is
// produced by one thread with a fixed reduction order, so results do not depend on the thread
// count.
#pragma once

#include <string_view>

#include "runtime/ops.h"
#include "runtime/tensor.h"

namespace moeforge::cpu {

void router_fwd(const Tensor& logits, ops::Gating gating, int k, const Tensor& bias, const Tensor& weights,
                const Tensor& experts, const Tensor& probs);
void router_bwd(const Tensor& logits, ops::Gating gating, const Tensor& experts, const Tensor& dweights,
                const Tensor& dprobs, const Tensor& dlogits);
void moe_aux_loss_fwd(const Tensor& probs, const Tensor& counts, int k, int64_t num_tokens, const Tensor& loss);
void moe_aux_loss_bwd(const Tensor& probs, const Tensor& counts, int k, int64_t num_tokens, float scale,
                      const Tensor& dprobs);
void router_z_loss_fwd(const Tensor& logits, int64_t num_tokens, const Tensor& loss);
void router_z_loss_bwd(const Tensor& logits, int64_t num_tokens, float scale, const Tensor& dlogits);
void router_fwd_with_stats(const Tensor& logits, ops::Gating gating, int k, const Tensor& bias, const Tensor& weights,
                           const Tensor& experts, const Tensor& probs, const ops::RouterStats& stats);
void moe_aux_loss_fwd_from_stats(const ops::RouterStats& stats, const Tensor& counts, int k, int64_t num_tokens,
                                 const Tensor& loss);
void router_z_loss_fwd_from_stats(const ops::RouterStats& stats, int64_t num_tokens, const Tensor& loss);
void router_bwd_fused(const Tensor& logits, ops::Gating gating, const Tensor& experts, const Tensor& dweights,
                      const Tensor& dprobs, const ops::RouterLossGrads& losses, const Tensor& dlogits);

void moe_plan(const Tensor& experts, int num_experts, const Tensor& positions, const Tensor& offsets);
void moe_apply_capacity(const Tensor& experts, int64_t capacity, const Tensor& base, const Tensor& dispatch);
void moe_permute_fwd(const Tensor& x, const Tensor& positions, const Tensor& out);
void moe_permute_bwd(const Tensor& dout, const Tensor& positions, const Tensor& dx);
void moe_unpermute_fwd(const Tensor& y, const Tensor& positions, const Tensor& weights, const Tensor& out);
void moe_unpermute_bwd(const Tensor& y, const Tensor& positions, const Tensor& weights, const Tensor& dout,
                       const Tensor& dy, const Tensor& dweights);

void grouped_gemm_fwd(const Tensor& x, const Tensor& w, const Tensor& offsets, const Tensor& out);
void grouped_gemm_bwd(const Tensor& x, const Tensor& w, const Tensor& offsets, const Tensor& dout, const Tensor& dx,
                      const Tensor& dw);

// Every id in experts (N, K) i32 lies in [0, num_experts); the error names op, position and value:
//   "moe_plan: experts[3, 1] = 9 is out of range [0, 8)"
void check_expert_ids(std::string_view op, const Tensor& experts, int64_t num_experts);

}  // namespace moeforge::cpu
