// CUDA kernels of the op catalog: one function per op of runtime/ops.h with the CPU kernel's
// signature, reached through MOE_DISPATCH (runtime/op_checks.h) for tensors on a CUDA device.
// Arguments arrive validated by runtime/ops_*.cpp. Each op runs on the compute stream of its
// tensors' device (runtime/cuda/device.h) and returns without waiting for the device, except
// sum_squares, whose result is a host value.
//
// Index values (ids, targets, expert ids, positions, offsets) live in device memory, where
// checking them would cost a host synchronisation per op. The kernels never read or write out of
// bounds because of them: a bad id or target turns its output row into NaN (visible in the loss),
// an out-of-range position or offset is skipped or clamped. The CPU backend, which the tests run,
// reports them as Errors.
//
// Dtypes: every op takes the combinations of the dtype contract in runtime/ops.h (f32, or bf16
// activations with f32 statistics, losses and routing; kernels widen bf16 loads to f32, compute
// in f32 and round once at each store); a Tensor-level op fails with MOE_CHECK on a dtype its
// kernels do not implement.
//
// Files, one per op family: elementwise.cu (+ casts), gemm.cpp (cuBLASLt), grouped_gemm.cu,
// embedding.cu, rmsnorm.cu, rope_swiglu.cu, cross_entropy.cu, attention.cu (+ flash_attention*.cu),
// router.cu, moe_dispatch.cu; the optimizer update is in adamw.h.
#pragma once

#include "runtime/ops.h"
#include "runtime/tensor.h"

namespace moeforge::cuda {

// ---- elementwise (elementwise.cu) ----
void fill(const Tensor& t, float value);  // f32, bf16, f16, i32, i64
void copy(const Tensor& src, const Tensor& dst);
void add(const Tensor& a, const Tensor& b, const Tensor& out);
void add_(const Tensor& dst, const Tensor& src, float alpha);
void scale_(const Tensor& t, float alpha);
double sum_squares(const Tensor& t);
// dst = src converted between f32, bf16 and f16 (round to nearest even, NaN stays NaN), same
// shape, same device; the same dtype is an exact copy.
void cast(const Tensor& src, const Tensor& dst);

// ---- matrix products (gemm.cpp, grouped_gemm.cu) ----
// cuBLASLt with fp32 accumulation. a, b: both f32 or both bf16; c: f32, or bf16 when a and b
// are. f32 operands use true fp32 products (no TF32), which the fp32 test mode relies on.
void gemm(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, const Tensor& c, bool accumulate,
          float alpha);
void grouped_gemm_fwd(const Tensor& x, const Tensor& w, const Tensor& offsets, const Tensor& out);
void grouped_gemm_bwd(const Tensor& x, const Tensor& w, const Tensor& offsets, const Tensor& dout, const Tensor& dx,
                      const Tensor& dw);

// ---- dense per-token ops ----
void embedding_fwd(const Tensor& ids, const Tensor& table, const Tensor& out, int64_t vocab_start,
                   int64_t vocab_size);
void embedding_bwd(const Tensor& ids, const Tensor& dout, const Tensor& dtable, int64_t vocab_start,
                   int64_t vocab_size);
void rmsnorm_fwd(const Tensor& x, const Tensor& w, float eps, const Tensor& out, const Tensor& rstd);
void rmsnorm_bwd(const Tensor& x, const Tensor& w, const Tensor& rstd, const Tensor& dout, const Tensor& dx,
                 const Tensor& dw);
void rope_fwd(const Tensor& x, float theta, const Tensor& out);
void rope_bwd(const Tensor& dout, float theta, const Tensor& dx);
void swiglu_fwd(const Tensor& gate, const Tensor& up, const Tensor& out);
void swiglu_bwd(const Tensor& gate, const Tensor& up, const Tensor& dout, const Tensor& dgate, const Tensor& dup);
void cross_entropy_fwd(const Tensor& logits, const Tensor& targets, const Tensor& losses, const Tensor& lse);
void cross_entropy_partial_fwd(const Tensor& logits, const Tensor& targets, int64_t vocab_start, int64_t valid_cols,
                               const Tensor& partial);
void cross_entropy_combine(const Tensor& partials, const Tensor& targets, int64_t vocab_size, const Tensor& losses,
                           const Tensor& lse);
void cross_entropy_bwd(const Tensor& logits, const Tensor& targets, const Tensor& lse, float scale,
                       const Tensor& dlogits, int64_t vocab_start, int64_t valid_cols);

// ---- attention (attention.cu) ----
// A mask other than plain causal runs on the fused bf16 kernels only (their window and packed
// documents); the f32 kernels refuse it.
void attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v, float scale, const Tensor& out,
                   const Tensor& lse, const ops::AttentionMask& mask);
void attention_bwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                   const Tensor& dout, float scale, const Tensor& dq, const Tensor& dk, const Tensor& dv,
                   const ops::AttentionMask& mask);

// ---- fused bf16 attention (flash_attention*.cu, ops_flash_attention.cpp) ----
// attention_fwd and attention_bwd above run it for bf16 q, k, v (head dim 64 or 128); f32 tensors
// take the exact fp32 kernels of attention.cu. Called directly, it also takes packed sequences and
// a sliding window (shapes and mask in runtime/cuda/attention_plan.h). The kernels that run are
// chosen per runtime/cuda/attention_kernel.h: ours (mma.sync, wgmma) or cuDNN's fused attention
// (runtime/cuda/cudnn_attention.h; dense tensors only).
struct FlashOptions {
  int64_t window = 0;  // > 0: query i sees keys j with i - j < window (Mistral); 0: plain causal
  Tensor cu_seqlens;   // (B + 1) i32 cumulative lengths on the device, or undefined (dense)
  int64_t max_seqlen = 0;  // the longest sequence, with cu_seqlens
};
// q, k, v, out bf16; lse f32 (B, H, T) or (H, R).
void flash_attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v, float scale, const Tensor& out,
                         const Tensor& lse, const FlashOptions& opt = {});
// dq, dk, dv bf16, written.
void flash_attention_bwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                         const Tensor& dout, float scale, const Tensor& dq, const Tensor& dk, const Tensor& dv,
                         const FlashOptions& opt = {});

// ---- MoE routing (fused_router.cu, router.cu, moe_dispatch.cu) ----
void router_fwd(const Tensor& logits, ops::Gating gating, int k, const Tensor& bias, const Tensor& weights,
                const Tensor& experts, const Tensor& probs);
void router_bwd(const Tensor& logits, ops::Gating gating, const Tensor& experts, const Tensor& dweights,
                const Tensor& dprobs, const Tensor& dlogits);
void moe_aux_loss_fwd(const Tensor& probs, const Tensor& counts, int k, int64_t num_tokens, const Tensor& loss);
void moe_aux_loss_bwd(const Tensor& probs, const Tensor& counts, int k, int64_t num_tokens, float scale,
                      const Tensor& dprobs);
void router_z_loss_fwd(const Tensor& logits, int64_t num_tokens, const Tensor& loss);
void router_z_loss_bwd(const Tensor& logits, int64_t num_tokens, float scale, const Tensor& dlogits);
void moe_plan(const Tensor& experts, int num_experts, const Tensor& positions, const Tensor& offsets);
void moe_apply_capacity(const Tensor& experts, int64_t capacity, const Tensor& base, const Tensor& dispatch);
void moe_permute_fwd(const Tensor& x, const Tensor& positions, const Tensor& out);
void moe_permute_bwd(const Tensor& dout, const Tensor& positions, const Tensor& dx);
void moe_unpermute_fwd(const Tensor& y, const Tensor& positions, const Tensor& weights, const Tensor& out);
void moe_unpermute_bwd(const Tensor& y, const Tensor& positions, const Tensor& weights, const Tensor& dout,
                       const Tensor& dy, const Tensor& dweights);

// ---- fused routing with the router losses (fused_router.cu, router.cu) ----
// The catalog's ops::router_fwd_with_stats, moe_aux_loss_fwd_from_stats,
// router_z_loss_fwd_from_stats and router_bwd_fused (runtime/ops.h) for CUDA tensors; arguments
// checked by the catalog. router_fwd_with_stats takes E <= 4096 (routing::kGatingMaxStatsExperts).
using ops::RouterLossGrads;
using ops::RouterStats;
void router_fwd_with_stats(const Tensor& logits, ops::Gating gating, int k, const Tensor& bias, const Tensor& weights,
                           const Tensor& experts, const Tensor& probs, const RouterStats& stats);
void moe_aux_loss_fwd_from_stats(const RouterStats& stats, const Tensor& counts, int k, int64_t num_tokens,
                                 const Tensor& loss);
void router_z_loss_fwd_from_stats(const RouterStats& stats, int64_t num_tokens, const Tensor& loss);
void router_bwd_fused(const Tensor& logits, ops::Gating gating, const Tensor& experts, const Tensor& dweights,
                      const Tensor& dprobs, const RouterLossGrads& losses, const Tensor& dlogits);

}  // namespace moeforge::cuda
