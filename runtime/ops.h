// The op catalog: every computation the model performs, device-neutral.
//
// Each op validates its arguments here (dtype, device, shapes — an error names the op and the
// shapes involved) and dispatches on the tensors' device to the CPU kernels in runtime/cpu/ (the
// numerical reference) or the CUDA kernels in runtime/cuda/. Model code calls only these.
//
// Conventions
//  - Shape letters: N rows (tokens, = B*T), B batch, T sequence, C width, H heads, Hkv kv heads,
//    D head dim, E experts, K top-k, F expert hidden, V vocab, M permuted token copies (= N*K).
//  - Dtypes (bf16 mixed precision). Float tensors are f32 or bf16; index tensors are i32 (ids,
//    experts, positions) or i64 (offsets, counts). Every op computes in f32 and rounds a bf16
//    output once. Activations and activation gradients ("F" below: x, out, dout, dx, q, k, v,
//    gate, up, logits, ...) are f32 or bf16, the same dtype within an op; weights (w, table) may
//    be f32 or bf16 independently of the activations; parameter-gradient outputs (dw, dtable) are
//    f32 (mixed precision's fp32 gradients) or F. Statistics stay f32 whatever the activations:
//    rstd, lse, losses, CE partials, and everything of routing (logits, probs, weights, the
//    aux and z losses). gemm: a and b share a dtype; f32 a/b give f32 c, bf16 a/b give bf16 or
//    f32 c. With f32 tensors every op is what it always was. The CPU backend computes in f32
//    only: it runs on widened f32 copies of bf16 operands (detail::Widened), the numerical
//    reference; the CUDA kernels load bf16, compute in f32 and round each store once.
//  - Gradient rule (as in llm.c): parameter gradients accumulate (+=), activation gradients are
//    written (=). The exceptions say so (router_z_loss_bwd adds a loss term's gradient).
//  - Outputs are passed as `const Tensor&` (Tensor is a handle) and must be preallocated with the
//    documented shape; outputs must not alias inputs unless the op says so.
#pragma once

#include "runtime/tensor.h"

namespace moeforge::ops {

// ---- elementwise and reductions -----------------------------------------------------------------
void fill(const Tensor& t, float value);               // t = value
void copy(const Tensor& src, const Tensor& dst);       // dst = src (same shape and dtype)
// dst = src converted (same shape; f32 <-> bf16, round to nearest even, NaN stays NaN).
void cast(const Tensor& src, const Tensor& dst);
void add(const Tensor& a, const Tensor& b, const Tensor& out);  // out = a + b; out may alias a or b
void add_(const Tensor& dst, const Tensor& src, float alpha = 1.0f);  // dst += alpha * src
void scale_(const Tensor& t, float alpha);             // t *= alpha
double sum_squares(const Tensor& t);                   // sum of t^2, accumulated in double

// ---- matrix products ----------------------------------------------------------------------------
// c = alpha * op(a) · op(b) (+ c when accumulate), op(x) = x or xᵀ. Each operand is viewed as a
// matrix: all leading dims form the rows, the last dim the columns. op(a) is (M, K), op(b) is
// (K, N), c is (M, N).
void gemm(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, const Tensor& c, bool accumulate = false,
          float alpha = 1.0f);

// Grouped expert GEMM over rows grouped by expert: x (M, Cin), w (E, Cout, Cin), offsets (E+1) i64
// with rows [offsets[e], offsets[e+1]) belonging to expert e. out (M, Cout): out_e = x_e · w_eᵀ.
void grouped_gemm_fwd(const Tensor& x, const Tensor& w, const Tensor& offsets, const Tensor& out);
// dx (M, Cin) = dout_e · w_e (written); dw (E, Cout, Cin) += dout_eᵀ · x_e.
void grouped_gemm_bwd(const Tensor& x, const Tensor& w, const Tensor& offsets, const Tensor& dout, const Tensor& dx,
                      const Tensor& dw);

// ---- embedding -----------------------------------------------------------------------------------
// Vocab-parallel lookup. table (Vl, C) holds rows [vocab_start, vocab_start + Vl) of the (padded)
// vocabulary: the whole table by default, or one tensor-parallel rank's shard. vocab_size is the
// real vocabulary; -1 means the table is the whole vocabulary (vocab_start must then be 0).
// ids (N) i32, each in [0, vocab_size); out (N, C) = table[id - vocab_start] for ids in this
// shard, 0 for the others, so the sum of the shards' outputs (the TP all-reduce) is the lookup.
void embedding_fwd(const Tensor& ids, const Tensor& table, const Tensor& out, int64_t vocab_start = 0,
                   int64_t vocab_size = -1);
// dtable (Vl, C) += scatter of dout (N, C) by ids; ids outside this shard contribute nothing.
void embedding_bwd(const Tensor& ids, const Tensor& dout, const Tensor& dtable, int64_t vocab_start = 0,
                   int64_t vocab_size = -1);

// ---- RMSNorm -------------------------------------------------------------------------------------
// x (N, C), w (C): out = x * rstd * w with rstd (N) = 1 / sqrt(mean(x^2) + eps). Leading dims of
// x and out are flattened into N.
void rmsnorm_fwd(const Tensor& x, const Tensor& w, float eps, const Tensor& out, const Tensor& rstd);
// dx (N, C) written; dw (C) accumulated.
void rmsnorm_bwd(const Tensor& x, const Tensor& w, const Tensor& rstd, const Tensor& dout, const Tensor& dx,
                 const Tensor& dw);

// ---- rotary position embedding -------------------------------------------------------------------
// x (B, T, H, D), the Hugging Face non-interleaved convention: element i < D/2 pairs with
// i + D/2 and both rotate by angle t * theta^(-2i/D) for position t. out may alias x.
void rope_fwd(const Tensor& x, float theta, const Tensor& out);
// The inverse rotation applied to the gradient. dx may alias dout.
void rope_bwd(const Tensor& dout, float theta, const Tensor& dx);

// ---- attention -----------------------------------------------------------------------------------
// Which keys a query sees besides the causal rule (key j <= query i): keys of its own document and
// keys within a window. The default mask is plain causal attention.
struct AttentionMask {
  // > 0: query i sees keys j with i - j < window (Mistral's sliding window); 0: no window.
  int64_t window = 0;
  // Documents packed into the rows: (S + 1) i32 cumulative document lengths over the B * T rows
  // flattened (b * T + t), on the op's device: 0 first, B * T last, increasing, every row start
  // b * T among them. A query sees keys of its document only. Undefined: each row is one sequence.
  Tensor cu_seqlens;
  int64_t max_seqlen = 0;  // the longest document (with cu_seqlens; the CUDA kernels plan with it)
  bool plain() const { return window == 0 && !cu_seqlens.defined(); }
};

// Causal grouped-query attention. q (B, T, H, D), k and v (B, T, Hkv, D) with H % Hkv == 0 (query
// head h reads kv head h / (H / Hkv)). out (B, T, H, D); lse (B, H, T) f32 receives each row's
// log-sum-exp of the scaled scores, which the backward uses to rebuild probabilities. Tiled with
// an online softmax: memory is linear in T. f32 everywhere; on CUDA also bf16 q/k/v/out and
// gradients (fp32 accumulation, lse f32), which run the fused flash-attention kernel (the only
// CUDA kernel that takes a mask other than plain causal).
void attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v, float scale, const Tensor& out,
                   const Tensor& lse, const AttentionMask& mask = {});
// dq (B, T, H, D), dk and dv (B, T, Hkv, D), all written. mask as in the forward.
void attention_bwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                   const Tensor& dout, float scale, const Tensor& dq, const Tensor& dk, const Tensor& dv,
                   const AttentionMask& mask = {});

// ---- SwiGLU --------------------------------------------------------------------------------------
// gate, up, out (N, F): out = silu(gate) * up.
void swiglu_fwd(const Tensor& gate, const Tensor& up, const Tensor& out);
// dgate, dup (N, F) written.
void swiglu_bwd(const Tensor& gate, const Tensor& up, const Tensor& dout, const Tensor& dgate, const Tensor& dup);

// ---- MoE routing -----------------------------------------------------------------------------------
enum class Gating {
  kSoftmaxTopK,  // Mixtral: p = softmax(logits) over all E; take the top k of p; w = p_sel / sum(p_sel)
  kSigmoidTopK,  // DeepSeek-V3: s = sigmoid(logits); select top k of s + bias; w = s_sel / sum(s_sel)
};
const char* gating_name(Gating g);

// logits (N, E). bias (E) or undefined: added to the scores for selection only (aux-loss-free
// balancing); never to the weights. Outputs: weights (N, K) combine weights, experts (N, K) i32
// the selected experts in descending order of selection score (ties: lower expert id first),
// probs (N, E) the per-token distribution over experts the load-balancing loss uses (softmax
// probabilities, or sigmoid scores normalised to sum 1).
void router_fwd(const Tensor& logits, Gating gating, int k, const Tensor& bias, const Tensor& weights,
                const Tensor& experts, const Tensor& probs);
// dweights (N, K); dprobs (N, E) or undefined (no aux loss). dlogits (N, E) written.
void router_bwd(const Tensor& logits, Gating gating, const Tensor& experts, const Tensor& dweights,
                const Tensor& dprobs, const Tensor& dlogits);

// Load-balancing loss (Switch / GShard form, normalised so a perfectly balanced router scores 1)
// over num_tokens tokens, of which probs (N, E) holds N rows; counts (E) i64 = token copies per
// expert over all num_tokens tokens. This op's part of the loss (1) is
//   E / (num_tokens * K) * sum_e counts_e * (1 / num_tokens) * sum_{n in these rows} probs[n, e],
// so with rows split over ranks (sequence parallel) and the global counts and token count, the
// ranks' parts sum to the loss; with num_tokens = N and local counts it is the whole loss. Counts
// are not differentiable; the gradient flows through probs. num_tokens >= N.
void moe_aux_loss_fwd(const Tensor& probs, const Tensor& counts, int k, int64_t num_tokens, const Tensor& loss);
// dprobs (N, E) written: scale * d loss / d probs = scale * E / (num_tokens * K) * counts_e / num_tokens.
void moe_aux_loss_bwd(const Tensor& probs, const Tensor& counts, int k, int64_t num_tokens, float scale,
                      const Tensor& dprobs);

// Router z-loss (ST-MoE) over num_tokens tokens, of which logits (N, E) holds N rows: this op's part
// of the loss (1) is sum_{n in these rows} logsumexp(logits[n])^2 / num_tokens (summed over ranks by
// the caller, as for the aux loss). num_tokens >= N.
void router_z_loss_fwd(const Tensor& logits, int64_t num_tokens, const Tensor& loss);
// dlogits (N, E) += scale * d loss / d logits = scale * 2 lse_n softmax(logits[n]) / num_tokens
// (accumulates: it adds to the router_bwd gradient).
void router_z_loss_bwd(const Tensor& logits, int64_t num_tokens, float scale, const Tensor& dlogits);

// The router with its losses in one pass over the logits (the model's path; on CUDA one gating
// kernel writes the statistics and one kernel the whole backward, runtime/cuda/fused_router.cu).
// Results equal the sequence router_fwd, moe_aux_loss_fwd, router_z_loss_fwd / moe_aux_loss_bwd,
// router_bwd, router_z_loss_bwd they replace: integers and gradients exactly on the CPU, the aux
// loss to f32 rounding (its per-expert mass is kept in f32).
struct RouterStats {
  Tensor prob_mass;  // (E) f32: sum over the N rows of probs[n, e]
  Tensor selected;   // (E) i64: copies the top-k routed to each expert (before any capacity dropping)
  Tensor lse;        // (N) f32: logsumexp(logits[n]); lse^2 is the row's z-loss term
  static RouterStats allocate(int64_t n, int64_t e, Device device);
};
// router_fwd, plus stats. CUDA: E <= 4096.
void router_fwd_with_stats(const Tensor& logits, Gating gating, int k, const Tensor& bias, const Tensor& weights,
                           const Tensor& experts, const Tensor& probs, const RouterStats& stats);
// moe_aux_loss_fwd(probs, counts, k, num_tokens, loss) for the probs stats was made with.
void moe_aux_loss_fwd_from_stats(const RouterStats& stats, const Tensor& counts, int k, int64_t num_tokens,
                                 const Tensor& loss);
// router_z_loss_fwd(logits, num_tokens, loss) for the logits stats was made with.
void router_z_loss_fwd_from_stats(const RouterStats& stats, int64_t num_tokens, const Tensor& loss);
// The loss gradients router_bwd_fused folds in; an undefined tensor leaves its term out.
struct RouterLossGrads {
  Tensor counts;  // (E) i64: adds moe_aux_loss_bwd(probs, counts, k, num_tokens, aux_scale) to dprobs
  int k = 1;
  float aux_scale = 0.0f;
  Tensor lse;  // (N) f32, RouterStats::lse: adds router_z_loss_bwd(logits, num_tokens, z_scale)
  float z_scale = 0.0f;
  int64_t num_tokens = 0;  // the losses' token count (>= N)
};
// dlogits (N, E) written: router_bwd with dprobs (or undefined) plus the aux loss's dprobs, then
// the z-loss's gradient added. probs is not needed: the aux loss's dprobs depend on counts only.
void router_bwd_fused(const Tensor& logits, Gating gating, const Tensor& experts, const Tensor& dweights,
                      const Tensor& dprobs, const RouterLossGrads& losses, const Tensor& dlogits);

// Token copies grouped by expert. experts (N, K) i32 -> positions (N, K) i32, the row of copy
// (n, k) in the expert-grouped buffer, and offsets (E+1) i64, the first row of each expert. The
// order inside an expert is the copies' (n, k) order, so the plan is deterministic. An expert id
// of -1 marks a dropped copy (capacity mode): its position is -1 and it takes no row, so the
// buffer has M = offsets[E] <= N * K rows.
void moe_plan(const Tensor& experts, int num_experts, const Tensor& positions, const Tensor& offsets);
// Capacity-mode dropping (DESIGN.md, token path). experts (N, K) i32 in [0, E); base (K, E) i64;
// dispatch (N, K) i32 written: experts[n, k], or -1 when the copy overflows its expert. Copies
// of an expert are ranked in priority order: slot k before slot k+1 (every token's first choice
// before any second choice, as GShard), then by row n; base[k, e] is the number of copies of
// expert e that rank before this tensor's slot-k copies (other slots, other ranks' rows). A copy
// is kept iff its rank < capacity.
void moe_apply_capacity(const Tensor& experts, int64_t capacity, const Tensor& base, const Tensor& dispatch);
// out (M, C): out[positions[n, k]] = x[n] for every kept copy (positions >= 0, a permutation of
// [0, M) over the kept copies).
void moe_permute_fwd(const Tensor& x, const Tensor& positions, const Tensor& out);
// dx (N, C) = sum over kept k of dout[positions[n, k]] (written; 0 for a row with no kept copy).
void moe_permute_bwd(const Tensor& dout, const Tensor& positions, const Tensor& dx);
// out (N, C) = sum over kept k of weights[n, k] * y[positions[n, k]].
void moe_unpermute_fwd(const Tensor& y, const Tensor& positions, const Tensor& weights, const Tensor& out);
// dy (M, C): dy[positions[n, k]] = weights[n, k] * dout[n]; dweights (N, K) = <dout[n], y[positions[n, k]]>,
// 0 for a dropped copy.
void moe_unpermute_bwd(const Tensor& y, const Tensor& positions, const Tensor& weights, const Tensor& dout,
                       const Tensor& dy, const Tensor& dweights);

// ---- loss ----------------------------------------------------------------------------------------
// Fused softmax cross-entropy. logits (N, V), targets (N) i32 (negative = ignored). losses (N)
// per-row loss (0 where ignored), lse (N) per-row log-sum-exp.
void cross_entropy_fwd(const Tensor& logits, const Tensor& targets, const Tensor& losses, const Tensor& lse);

// Vocab-parallel cross-entropy, forward in two steps (Megatron's): each shard reduces its logits to
// three numbers per row, the partials of all shards are gathered, and any rank combines them.
//
// Per-row statistics of this shard's logits (N, Vl), which hold the global vocabulary columns
// [vocab_start, vocab_start + Vl), of which only the first valid_cols (in [0, Vl]) are real: the
// rest is padding and ignored. partial (N, 3) f32 = [row max over the valid columns (-inf if there
// are none), sum over the valid columns of exp(logit - row max), the target's logit if the target
// is in this shard's valid range else 0]. Rows with a negative (ignored) target still get the max
// and sum. Targets are not range-checked here (cross_entropy_combine does).
void cross_entropy_partial_fwd(const Tensor& logits, const Tensor& targets, int64_t vocab_start, int64_t valid_cols,
                               const Tensor& partial);
// Combines the partials (R, N, 3) of all R shards, in rank order, into losses (N) (0 where the
// target is ignored) and lse (N): lse = M + log(sum_r s_r exp(m_r - M)) with M = max_r m_r, and
// loss = lse - sum_r target_logit_r. Targets must be < vocab_size, the real vocabulary.
void cross_entropy_combine(const Tensor& partials, const Tensor& targets, int64_t vocab_size, const Tensor& losses,
                           const Tensor& lse);

// dlogits (N, Vl) = scale * (softmax(logits) - onehot(target)) from the full rows' lse (N), zero
// rows where ignored. For a shard (vocab_start, valid_cols as in cross_entropy_partial_fwd), column
// v < valid_cols gets scale * (exp(logit - lse) - [target == vocab_start + v]) and the padding
// columns get 0. valid_cols = -1 means the logits are the whole vocabulary (vocab_start must then
// be 0) and the targets are checked to be < Vl; a shard cannot tell another shard's target from a
// bad one, so its targets are left to cross_entropy_combine. dlogits may alias logits (the
// backward then overwrites them in place).
void cross_entropy_bwd(const Tensor& logits, const Tensor& targets, const Tensor& lse, float scale,
                       const Tensor& dlogits, int64_t vocab_start = 0, int64_t valid_cols = -1);

}  // namespace moeforge::ops
