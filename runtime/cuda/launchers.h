// Launchers of the CUDA kernels: plain pointers, sizes and the stream, no Tensor (see the note in
// runtime/cuda/common.cuh on why the .cu files stay free of fmt). Each enqueues its kernels on
// `s` and returns cudaGetLastError() of the launch; the Tensor-level ops in runtime/cuda/ops_*.cpp
// validate sizes against the grid limits, allocate the scratch named here, and check the status.
// Shapes and semantics are those of runtime/ops.h.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "runtime/cuda/attention_plan.h"
#include "runtime/cuda/attention_plan_sm90.h"
#include "runtime/cuda/routing_plan.h"
#include "runtime/dtype.h"

namespace moeforge::cuda::launch {

// ---- elementwise.cu ----
cudaError_t fill(void* p, DType dtype, int64_t n, float value, cudaStream_t s);
// Compute dtypes (f32, bf16) as noted; f32 arithmetic, one rounding per stored element.
// a, b, out: one dtype.
cudaError_t add(const void* a, const void* b, void* out, DType dtype, int64_t n, cudaStream_t s);
// dst += alpha * src; dst and src each f32 or bf16.
cudaError_t axpy(void* dst, DType dst_dtype, const void* src, DType src_dtype, float alpha, int64_t n,
                 cudaStream_t s);
cudaError_t scale(void* p, DType dtype, float alpha, int64_t n, cudaStream_t s);
// scratch: kSumSquaresScratch doubles; the result lands in scratch[kSumSquaresScratch - 1].
constexpr int kSumSquaresScratch = 513;
cudaError_t sum_squares(const void* p, DType dtype, int64_t n, double* scratch, cudaStream_t s);
// f32, bf16 and f16 in any combination.
cudaError_t cast(const void* src, DType src_dtype, void* dst, DType dst_dtype, int64_t n, cudaStream_t s);

// ---- embedding.cu ----
// table and out each f32 or bf16.
cudaError_t embedding_fwd(const int32_t* ids, int64_t n, const void* table, DType table_dtype, int64_t rows,
                          int64_t c, void* out, DType out_dtype, int64_t vocab_start, int64_t vocab_size,
                          cudaStream_t s);
// Scratch of the backward: keys and positions of 2 n int32 each, and the sort's temp storage.
size_t embedding_bwd_temp_bytes(int64_t n, int64_t rows);
// dout and dtable each f32 or bf16 (each table row's run is summed in f32, rounded once).
cudaError_t embedding_bwd(const int32_t* ids, int64_t n, const void* dout, DType dout_dtype, void* dtable,
                          DType dtable_dtype, int64_t rows, int64_t c, int64_t vocab_start, int64_t vocab_size,
                          int32_t* keys, int32_t* positions, void* temp, size_t temp_bytes, cudaStream_t s);

// ---- rmsnorm.cu ----
// Storage dtypes (f32 or bf16 each): x of x, out, dout and dx; w of w; dw of dw. rstd is f32.
struct RmsNormDTypes {
  DType x, w, dw;
};
cudaError_t rmsnorm_fwd(const void* x, const void* w, float eps, void* out, float* rstd, int64_t n, int64_t c,
                        const RmsNormDTypes& t, cudaStream_t s);
// Chunks of rows the dw reduction uses; partial holds chunks * c floats.
int64_t rmsnorm_bwd_chunks(int64_t n);
cudaError_t rmsnorm_bwd(const void* x, const void* w, const float* rstd, const void* dout, void* dx, void* dw,
                        int64_t n, int64_t c, float* partial, const RmsNormDTypes& t, cudaStream_t s);

// ---- rope_swiglu.cu ----
// x, out (B, T, H, D), one dtype (f32 or bf16); sign +1 forward, -1 the inverse rotation; table
// holds 2 * T * (D / 2) floats.
cudaError_t rope(const void* x, void* out, DType dtype, int64_t b, int64_t t, int64_t h, int64_t d, float theta,
                 float sign, float* table, cudaStream_t s);
// All tensors of one dtype (f32 or bf16).
cudaError_t swiglu_fwd(const void* gate, const void* up, void* out, DType dtype, int64_t n, cudaStream_t s);
cudaError_t swiglu_bwd(const void* gate, const void* up, const void* dout, void* dgate, void* dup, DType dtype,
                       int64_t n, cudaStream_t s);

// ---- cross_entropy.cu ----
// logits (and dlogits, the same dtype) f32 or bf16; losses, lse, partials f32.
cudaError_t cross_entropy_fwd(const void* logits, DType logits_dtype, const int32_t* targets, float* losses,
                              float* lse, int64_t n, int64_t v, cudaStream_t s);
cudaError_t cross_entropy_partial_fwd(const void* logits, DType logits_dtype, const int32_t* targets, int64_t n,
                                      int64_t v, int64_t vocab_start, int64_t valid_cols, float* partial,
                                      cudaStream_t s);
cudaError_t cross_entropy_combine(const float* partials, const int32_t* targets, int64_t r_count, int64_t n,
                                  int64_t vocab_size, float* losses, float* lse, cudaStream_t s);
// valid_cols < 0: the whole vocabulary, and targets >= v give NaN rows.
cudaError_t cross_entropy_bwd(const void* logits, DType logits_dtype, const int32_t* targets, const float* lse,
                              float scale, void* dlogits, int64_t n, int64_t v, int64_t vocab_start,
                              int64_t valid_cols, cudaStream_t s);

// ---- attention.cu ----
struct AttentionDims {
  int64_t B, T, H, Hkv, D;
};
constexpr int64_t kAttentionMaxHeadDim = 256;
cudaError_t attention_fwd(const AttentionDims& d, const float* q, const float* k, const float* v, float scale,
                          float* out, float* lse, cudaStream_t s);
// delta: scratch of B * H * T floats.
cudaError_t attention_bwd(const AttentionDims& d, const float* q, const float* k, const float* v, const float* out,
                          const float* lse, const float* dout, float scale, float* dq, float* dk, float* dv,
                          float* delta, cudaStream_t s);

// ---- flash_attention.cu (fused bf16 attention on the tensor cores; sizes and tiles planned by
// flash::plan_flash_attention, pointers and sizes in args) ----
cudaError_t flash_attention_fwd(const flash::FlashArgs& args, const flash::Plan& plan, cudaStream_t s);
// Also writes args.delta (the dO·O pre-pass).
cudaError_t flash_attention_bwd(const flash::FlashArgs& args, const flash::Plan& plan, cudaStream_t s);
// ---- flash_attention_sm90.cu (the Hopper forward on wgmma + TMA, sm_90a; built only when 90 is
// among the CUDA architectures, which defines MOEFORGE_WITH_SM90_ATTENTION) ----
cudaError_t flash_attention_fwd_sm90(const flash::FlashArgs& args, const flash::sm90::Sm90Plan& plan, cudaStream_t s);
// flash_attention_sm90_bwd.cu. Also writes args.delta (the dO·O pre-pass).
cudaError_t flash_attention_bwd_sm90(const flash::FlashArgs& args, const flash::sm90::Sm90BwdPlan& plan,
                                     cudaStream_t s);

// ---- grouped_gemm.cu ----
// x, w, out, dout, dx of `dtype` (f32 or bf16); dw of dw_dtype (f32, or bf16 with bf16 operands).
cudaError_t grouped_gemm_fwd(const void* x, const void* w, const int64_t* offsets, void* out, DType dtype, int64_t m,
                             int64_t num_experts, int64_t cin, int64_t cout, cudaStream_t s);
cudaError_t grouped_gemm_bwd(const void* x, const void* w, const int64_t* offsets, const void* dout, void* dx,
                             void* dw, DType dtype, DType dw_dtype, int64_t m, int64_t num_experts, int64_t cin,
                             int64_t cout, cudaStream_t s);

// ---- fused_router.cu ----
// The aux loss's and z-loss's statistics the gating kernel can produce on the way (internal; see
// cuda::router_fwd_with_stats in kernels.h). Partial tables as routing::plan_gating(n, e, true)
// sizes them: mass_partial (partial_rows, E) f64, count_partial (partial_rows, E) int32; the
// launcher's second kernel reduces them, in block order, into prob_mass (E) f32 and selected (E)
// i64. lse (n) f32: logsumexp of each logits row.
struct RouterStatsBuffers {
  double* mass_partial;
  int32_t* count_partial;
  float* prob_mass;
  int64_t* selected;
  float* lse;
};
// stats: nullptr for plain router_fwd.
cudaError_t fused_router_fwd(const float* logits, int64_t n, int64_t e, bool sigmoid, int k, const float* bias,
                             float* weights, int32_t* experts, float* probs, const RouterStatsBuffers* stats,
                             cudaStream_t s);
// router_bwd with the loss terms folded in: the probs gradient is dprobs (n, e) (or none) plus
// dprobs_row (e) added to every row (or none: the aux loss's gradient is the same for every row);
// with lse (n) given, z_scale * 2 lse / num_tokens * softmax(logits) is added (router_z_loss_bwd).
cudaError_t fused_router_bwd(const float* logits, int64_t n, int64_t e, bool sigmoid, int k, const int32_t* experts,
                             const float* dweights, const float* dprobs, const float* dprobs_row, const float* lse,
                             float z_scale, int64_t num_tokens, float* dlogits, cudaStream_t s);

// ---- router.cu (losses) ----
// scratch: routing::plan_column_sums(n, e).row_blocks * e + e doubles.
cudaError_t moe_aux_loss_fwd(const float* probs, const int64_t* counts, int64_t n, int64_t e, int k,
                             int64_t num_tokens, float* loss, double* scratch, cudaStream_t s);
// The same loss from the probability mass (e) router_fwd_with_stats reduced over the n rows.
cudaError_t moe_aux_loss_fwd_from_mass(const float* prob_mass, const int64_t* counts, int64_t n, int64_t e, int k,
                                       int64_t num_tokens, float* loss, cudaStream_t s);
cudaError_t moe_aux_loss_bwd(const int64_t* counts, int64_t n, int64_t e, int k, int64_t num_tokens, float scale,
                             float* dprobs, cudaStream_t s);
// scratch: n floats (the rows' lse).
cudaError_t router_z_loss_fwd(const float* logits, int64_t n, int64_t e, int64_t num_tokens, float* loss,
                              float* scratch, cudaStream_t s);
// The same loss from the rows' saved lse (n).
cudaError_t router_z_loss_fwd_from_lse(const float* lse, int64_t n, int64_t num_tokens, float* loss, cudaStream_t s);
cudaError_t router_z_loss_bwd(const float* logits, int64_t n, int64_t e, int64_t num_tokens, float scale,
                              float* dlogits, cudaStream_t s);

// ---- moe_dispatch.cu ----
// Stable ranks of expert ids by counting sort (e <= routing::kMaxRankExperts); scratch holds
// routing::plan_ranks(count, e).scratch_i32 int32.
cudaError_t moe_plan(const int32_t* experts, int64_t m, int64_t e, int32_t* positions, int64_t* offsets,
                     int32_t* scratch, cudaStream_t s);
// experts, dispatch (n, k); base (k, e). scratch as for moe_plan with count n.
cudaError_t moe_apply_capacity(const int32_t* experts, int64_t n, int64_t k, int64_t e, int64_t capacity,
                               const int64_t* base, int32_t* dispatch, int32_t* scratch, cudaStream_t s);
// x (n, c), positions (n, k), out (m, c). Row tensors (x/out, dout/dx, y/dout/dy) share `dtype`
// (f32 or bf16); weights and dweights are f32.
cudaError_t moe_permute_fwd(const void* x, const int32_t* positions, void* out, DType dtype, int64_t n, int64_t k,
                            int64_t c, int64_t m, cudaStream_t s);
cudaError_t moe_permute_bwd(const void* dout, const int32_t* positions, void* dx, DType dtype, int64_t n, int64_t k,
                            int64_t c, int64_t m, cudaStream_t s);
cudaError_t moe_unpermute_fwd(const void* y, const int32_t* positions, const float* weights, void* out, DType dtype,
                              int64_t n, int64_t k, int64_t c, int64_t m, cudaStream_t s);
cudaError_t moe_unpermute_bwd(const void* y, const int32_t* positions, const float* weights, const void* dout,
                              void* dy, float* dweights, DType dtype, int64_t n, int64_t k, int64_t c, int64_t m,
                              cudaStream_t s);

// ---- adamw.cu ----
// Per-step scalars of the AdamW update (see optim/adamw.h), each rounded to f32 once.
struct AdamWCoefficients {
  float decay;  // 1 - lr * wd, for tensors with weight decay
  float beta1, one_minus_beta1;
  float beta2, one_minus_beta2;
  float step_size;   // lr / (1 - beta1^t)
  float bias2_sqrt;  // sqrt(1 - beta2^t)
  float eps;
};
// One tensor of the update: fp32 master p, gradient g, moments m and v (n elements each), and an
// optional bf16 copy of p written after the update (the compute weights of mixed precision).
struct AdamWTensor {
  float* p;
  const float* g;
  float* m;
  float* v;
  void* p_bf16;  // __nv_bfloat16*, or nullptr
  int64_t n;
  bool decay;
};
// All tensors in as few launches as fit the kernel-argument limit (multi-tensor apply).
cudaError_t adamw(const AdamWTensor* tensors, int64_t count, const AdamWCoefficients& c, cudaStream_t s);

}  // namespace moeforge::cuda::launch
