// Tensor-level CUDA MoE routing ops and the grouped expert GEMM: grid-limit checks, scratch from
// the caching allocator, launch status checks (kernels in fused_router.cu, router.cu,
// moe_dispatch.cu and grouped_gemm.cu).
#include "runtime/cuda/cuda_check.h"
#include "runtime/cuda/device.h"
#include "runtime/cuda/kernels.h"
#include "runtime/cuda/launchers.h"

namespace moeforge::cuda {
namespace {

cudaStream_t stream_of(const Tensor& t) { return stream(t.device().index); }

void check_blocks(std::string_view op, int64_t blocks, std::string_view what) {
  MOE_CHECK(blocks < (int64_t{1} << 31), "{}: {} {} exceed the CUDA grid", op, blocks, what);
}

void check_experts(std::string_view op, int64_t e) {
  MOE_CHECK(e <= launch::kMaxRankExperts, "{}: {} experts exceed the CUDA kernel's maximum of {}", op, e,
            launch::kMaxRankExperts);
}

// Scratch of the stable-rank kernels for `count` ids over e experts.
Tensor rank_scratch(const Tensor& like, int64_t count, int64_t e) {
  return Tensor::empty({std::max<int64_t>(1, launch::rank_chunks(count) * e)}, DType::kI64, like.device());
}

}  // namespace

void router_fwd(const Tensor& logits, ops::Gating gating, int k, const Tensor& bias, const Tensor& weights,
                const Tensor& experts, const Tensor& probs) {
  const int64_t n = logits.dim(0), e = logits.dim(1);
  if (n == 0) return;
  check_blocks("router_fwd", (n + 3) / 4, "blocks of 4 tokens");
  MOE_CUDA_CHECK(launch::fused_router_fwd(logits.data<float>(), n, e, gating == ops::Gating::kSigmoidTopK, k,
                                    bias.defined() ? bias.data<float>() : nullptr, weights.data<float>(),
                                    experts.data<int32_t>(), probs.data<float>(), stream_of(logits)));
}

void router_bwd(const Tensor& logits, ops::Gating gating, const Tensor& experts, const Tensor& dweights,
                const Tensor& dprobs, const Tensor& dlogits) {
  const int64_t n = logits.dim(0), e = logits.dim(1);
  if (n == 0) return;
  check_blocks("router_bwd", (n + 3) / 4, "blocks of 4 tokens");
  MOE_CUDA_CHECK(launch::fused_router_bwd(logits.data<float>(), n, e, gating == ops::Gating::kSigmoidTopK,
                                    static_cast<int>(experts.dim(1)), experts.data<int32_t>(), dweights.data<float>(),
                                    dprobs.defined() ? dprobs.data<float>() : nullptr, dlogits.data<float>(),
                                    stream_of(logits)));
}

void moe_aux_loss_fwd(const Tensor& probs, const Tensor& counts, int k, int64_t num_tokens, const Tensor& loss) {
  const int64_t e = probs.dim(1);
  const Tensor scratch = Tensor::empty({e}, DType::kI64, probs.device());  // e doubles
  MOE_CUDA_CHECK(launch::moe_aux_loss_fwd(probs.data<float>(), counts.data<int64_t>(), probs.dim(0), e, k, num_tokens,
                                          loss.data<float>(), static_cast<double*>(scratch.raw_data()),
                                          stream_of(probs)));
}

void moe_aux_loss_bwd(const Tensor& probs, const Tensor& counts, int k, int64_t num_tokens, float scale,
                      const Tensor& dprobs) {
  if (probs.numel() == 0) return;
  MOE_CUDA_CHECK(launch::moe_aux_loss_bwd(counts.data<int64_t>(), probs.dim(0), probs.dim(1), k, num_tokens, scale,
                                          dprobs.data<float>(), stream_of(probs)));
}

void router_z_loss_fwd(const Tensor& logits, int64_t num_tokens, const Tensor& loss) {
  const int64_t n = logits.dim(0);
  const Tensor scratch = Tensor::empty({std::max<int64_t>(n, 1)}, DType::kF32, logits.device());
  MOE_CUDA_CHECK(launch::router_z_loss_fwd(logits.data<float>(), n, logits.dim(1), num_tokens, loss.data<float>(),
                                           scratch.data<float>(), stream_of(logits)));
}

void router_z_loss_bwd(const Tensor& logits, int64_t num_tokens, float scale, const Tensor& dlogits) {
  const int64_t n = logits.dim(0);
  if (n == 0) return;
  MOE_CUDA_CHECK(launch::router_z_loss_bwd(logits.data<float>(), n, logits.dim(1), num_tokens, scale,
                                           dlogits.data<float>(), stream_of(logits)));
}

void moe_plan(const Tensor& experts, int num_experts, const Tensor& positions, const Tensor& offsets) {
  check_experts("moe_plan", num_experts);
  const int64_t m = experts.numel();
  const Tensor scratch = rank_scratch(experts, m, num_experts);
  MOE_CUDA_CHECK(launch::moe_plan(experts.data<int32_t>(), m, num_experts, positions.data<int32_t>(),
                                  offsets.data<int64_t>(), scratch.data<int64_t>(), stream_of(experts)));
}

void moe_apply_capacity(const Tensor& experts, int64_t capacity, const Tensor& base, const Tensor& dispatch) {
  const int64_t n = experts.dim(0), k = experts.dim(1), e = base.dim(1);
  check_experts("moe_apply_capacity", e);
  if (n == 0 || k == 0) return;
  MOE_CHECK(capacity >= 0, "moe_apply_capacity: capacity={} must be >= 0", capacity);
  const Tensor scratch = rank_scratch(experts, n, e);
  MOE_CUDA_CHECK(launch::moe_apply_capacity(experts.data<int32_t>(), n, k, e, capacity, base.data<int64_t>(),
                                            dispatch.data<int32_t>(), scratch.data<int64_t>(), stream_of(experts)));
}

void moe_permute_fwd(const Tensor& x, const Tensor& positions, const Tensor& out) {
  const int64_t n = x.dim(0), c = x.dim(1);
  if (n == 0 || c == 0) return;
  check_blocks("moe_permute_fwd", n, "token rows");
  MOE_CUDA_CHECK(launch::moe_permute_fwd(x.data<float>(), positions.data<int32_t>(), out.data<float>(), n,
                                         positions.dim(1), c, out.dim(0), stream_of(x)));
}

void moe_permute_bwd(const Tensor& dout, const Tensor& positions, const Tensor& dx) {
  const int64_t n = dx.dim(0), c = dx.dim(1);
  if (n == 0 || c == 0) return;
  check_blocks("moe_permute_bwd", n, "token rows");
  MOE_CUDA_CHECK(launch::moe_permute_bwd(dout.data<float>(), positions.data<int32_t>(), dx.data<float>(), n,
                                         positions.dim(1), c, dout.dim(0), stream_of(dx)));
}

void moe_unpermute_fwd(const Tensor& y, const Tensor& positions, const Tensor& weights, const Tensor& out) {
  const int64_t n = out.dim(0), c = out.dim(1);
  if (n == 0 || c == 0) return;
  check_blocks("moe_unpermute_fwd", n, "token rows");
  MOE_CUDA_CHECK(launch::moe_unpermute_fwd(y.data<float>(), positions.data<int32_t>(), weights.data<float>(),
                                           out.data<float>(), n, positions.dim(1), c, y.dim(0), stream_of(out)));
}

void moe_unpermute_bwd(const Tensor& y, const Tensor& positions, const Tensor& weights, const Tensor& dout,
                       const Tensor& dy, const Tensor& dweights) {
  const int64_t n = dout.dim(0), c = dout.dim(1), k = positions.dim(1);
  if (n == 0) return;
  check_blocks("moe_unpermute_bwd", n * k, "token copies");
  MOE_CUDA_CHECK(launch::moe_unpermute_bwd(y.data<float>(), positions.data<int32_t>(), weights.data<float>(),
                                           dout.data<float>(), dy.data<float>(), dweights.data<float>(), n, k, c,
                                           y.dim(0), stream_of(dout)));
}

void grouped_gemm_fwd(const Tensor& x, const Tensor& w, const Tensor& offsets, const Tensor& out) {
  const int64_t m = x.dim(0), e = w.dim(0), cout = w.dim(1);
  if (m == 0 || cout == 0) return;
  MOE_CHECK((m + 63) / 64 + e < (int64_t{1} << 31) && (cout + 63) / 64 < 65536,
            "grouped_gemm_fwd: x {} and w {} exceed the CUDA grid", x.shape().str(), w.shape().str());
  MOE_CUDA_CHECK(launch::grouped_gemm_fwd(x.data<float>(), w.data<float>(), offsets.data<int64_t>(), out.data<float>(),
                                          m, e, x.dim(1), cout, stream_of(x)));
}

void grouped_gemm_bwd(const Tensor& x, const Tensor& w, const Tensor& offsets, const Tensor& dout, const Tensor& dx,
                      const Tensor& dw) {
  const int64_t m = x.dim(0), cin = x.dim(1), e = w.dim(0), cout = w.dim(1);
  if (e == 0 || cin == 0) return;
  if (cout == 0) {  // dx = dout · w is an empty sum; dw has no elements
    if (m > 0) fill(dx, 0.0f);
    return;
  }
  MOE_CHECK((m + 63) / 64 + e < (int64_t{1} << 31) && (std::max(cin, cout) + 63) / 64 < 65536 && e < 65536,
            "grouped_gemm_bwd: x {} and w {} exceed the CUDA grid", x.shape().str(), w.shape().str());
  MOE_CUDA_CHECK(launch::grouped_gemm_bwd(x.data<float>(), w.data<float>(), offsets.data<int64_t>(),
                                          dout.data<float>(), dx.data<float>(), dw.data<float>(), m, e, cin, cout,
                                          stream_of(x)));
}

}  // namespace moeforge::cuda
