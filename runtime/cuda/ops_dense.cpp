// Tensor-level CUDA dense per-token ops and attention: grid-limit checks, scratch from the caching
// allocator, launch status checks (kernels in embedding.cu, rmsnorm.cu, rope_swiglu.cu,
// cross_entropy.cu and attention.cu).
#include "runtime/cuda/cuda_check.h"
#include "runtime/cuda/device.h"
#include "runtime/cuda/kernels.h"
#include "runtime/cuda/launchers.h"

namespace moeforge::cuda {
namespace {

// One block per row: the row count must fit the grid's x dimension.
void check_row_grid(const char* op, int64_t rows) {
  MOE_CHECK(rows < (int64_t{1} << 31), "{}: {} rows exceed the CUDA grid (one block per row)", op, rows);
}

cudaStream_t stream_of(const Tensor& t) { return stream(t.device().index); }

}  // namespace

void embedding_fwd(const Tensor& ids, const Tensor& table, const Tensor& out, int64_t vocab_start,
                   int64_t vocab_size) {
  const int64_t n = ids.numel(), c = table.dim(1);
  if (n == 0 || c == 0) return;
  check_row_grid("embedding_fwd", n);
  MOE_CUDA_CHECK_COMPUTE_DTYPE("embedding_fwd", "table", table);
  MOE_CUDA_CHECK_COMPUTE_DTYPE("embedding_fwd", "out", out);
  MOE_CUDA_CHECK(launch::embedding_fwd(ids.data<int32_t>(), n, table.raw_data(), table.dtype(), table.dim(0), c,
                                       out.raw_data(), out.dtype(), vocab_start, vocab_size, stream_of(out)));
}

void embedding_bwd(const Tensor& ids, const Tensor& dout, const Tensor& dtable, int64_t vocab_start,
                   int64_t vocab_size) {
  const int64_t n = ids.numel(), rows = dtable.dim(0), c = dtable.dim(1);
  if (n == 0 || c == 0) return;
  MOE_CUDA_CHECK_COMPUTE_DTYPE("embedding_bwd", "dout", dout);
  MOE_CHECK(dtable.dtype() == DType::kF32 || dtable.dtype() == dout.dtype(),
            "embedding_bwd: the CUDA kernel takes dtable as f32 or dout's dtype ({}), got {}", dout.str(),
            dtable.str());
  MOE_CHECK(n < (int64_t{1} << 31) && rows < (int64_t{1} << 31) - 1,
            "embedding_bwd: {} ids or {} table rows exceed the 32-bit sort keys", n, rows);
  const size_t temp_bytes = launch::embedding_bwd_temp_bytes(n, rows);
  MOE_CHECK(temp_bytes > 0, "embedding_bwd: CUB reports no temp storage size for sorting {} ids", n);
  const Tensor keys = Tensor::empty({2 * n}, DType::kI32, ids.device());
  const Tensor positions = Tensor::empty({2 * n}, DType::kI32, ids.device());
  const Tensor temp = Tensor::empty({static_cast<int64_t>(temp_bytes)}, DType::kBF16, ids.device());  // >= bytes
  MOE_CUDA_CHECK(launch::embedding_bwd(ids.data<int32_t>(), n, dout.raw_data(), dout.dtype(), dtable.raw_data(),
                                       dtable.dtype(), rows, c, vocab_start, vocab_size, keys.data<int32_t>(),
                                       positions.data<int32_t>(),
                                       temp.raw_data(), temp_bytes, stream_of(ids)));
}

void rmsnorm_fwd(const Tensor& x, const Tensor& w, float eps, const Tensor& out, const Tensor& rstd) {
  const int64_t c = w.numel(), n = x.numel() / c;
  if (n == 0) return;
  check_row_grid("rmsnorm_fwd", n);
  MOE_CUDA_CHECK_COMPUTE_DTYPE("rmsnorm_fwd", "x", x);
  MOE_CUDA_CHECK_SAME_DTYPE("rmsnorm_fwd", "out", out, "x", x);
  MOE_CUDA_CHECK_COMPUTE_DTYPE("rmsnorm_fwd", "w", w);
  MOE_CHECK(rstd.dtype() == DType::kF32, "rmsnorm_fwd: rstd must be f32, got {}", rstd.str());
  const launch::RmsNormDTypes t{x.dtype(), w.dtype(), DType::kF32};
  MOE_CUDA_CHECK(launch::rmsnorm_fwd(x.raw_data(), w.raw_data(), eps, out.raw_data(), rstd.data<float>(), n, c, t,
                                     stream_of(x)));
}

void rmsnorm_bwd(const Tensor& x, const Tensor& w, const Tensor& rstd, const Tensor& dout, const Tensor& dx,
                 const Tensor& dw) {
  const int64_t c = w.numel(), n = x.numel() / c;
  if (n == 0) return;
  check_row_grid("rmsnorm_bwd", n);
  MOE_CUDA_CHECK_COMPUTE_DTYPE("rmsnorm_bwd", "x", x);
  MOE_CUDA_CHECK_SAME_DTYPE("rmsnorm_bwd", "dout", dout, "x", x);
  MOE_CUDA_CHECK_SAME_DTYPE("rmsnorm_bwd", "dx", dx, "x", x);
  MOE_CUDA_CHECK_COMPUTE_DTYPE("rmsnorm_bwd", "w", w);
  MOE_CUDA_CHECK_COMPUTE_DTYPE("rmsnorm_bwd", "dw", dw);
  MOE_CHECK(rstd.dtype() == DType::kF32, "rmsnorm_bwd: rstd must be f32, got {}", rstd.str());
  const int64_t chunks = launch::rmsnorm_bwd_chunks(n);
  MOE_CHECK(chunks < 65536, "rmsnorm_bwd: {} rows exceed the CUDA grid ({} chunks)", n, chunks);
  const Tensor partial = Tensor::empty({chunks, c}, DType::kF32, x.device());
  const launch::RmsNormDTypes t{x.dtype(), w.dtype(), dw.dtype()};
  MOE_CUDA_CHECK(launch::rmsnorm_bwd(x.raw_data(), w.raw_data(), rstd.data<float>(), dout.raw_data(), dx.raw_data(),
                                     dw.raw_data(), n, c, partial.data<float>(), t, stream_of(x)));
}

namespace {
void rope_rotate(const char* op, const Tensor& x, float theta, float sign, const Tensor& out) {
  MOE_CUDA_CHECK_COMPUTE_DTYPE(op, "x", x);
  MOE_CUDA_CHECK_SAME_DTYPE(op, "out", out, "x", x);
  const int64_t b = x.dim(0), t = x.dim(1), h = x.dim(2), d = x.dim(3);
  if (b * t * h == 0 || d == 0) return;
  const Tensor table = Tensor::empty({2, t, d / 2}, DType::kF32, x.device());
  MOE_CUDA_CHECK(launch::rope(x.raw_data(), out.raw_data(), x.dtype(), b, t, h, d, theta, sign, table.data<float>(),
                              stream_of(x)));
}
}  // namespace

void rope_fwd(const Tensor& x, float theta, const Tensor& out) { rope_rotate("rope_fwd", x, theta, 1.0f, out); }

void rope_bwd(const Tensor& dout, float theta, const Tensor& dx) { rope_rotate("rope_bwd", dout, theta, -1.0f, dx); }

void swiglu_fwd(const Tensor& gate, const Tensor& up, const Tensor& out) {
  MOE_CUDA_CHECK_COMPUTE_DTYPE("swiglu_fwd", "gate", gate);
  MOE_CUDA_CHECK_SAME_DTYPE("swiglu_fwd", "up", up, "gate", gate);
  MOE_CUDA_CHECK_SAME_DTYPE("swiglu_fwd", "out", out, "gate", gate);
  if (gate.numel() == 0) return;
  MOE_CUDA_CHECK(launch::swiglu_fwd(gate.raw_data(), up.raw_data(), out.raw_data(), gate.dtype(), gate.numel(),
                                    stream_of(gate)));
}

void swiglu_bwd(const Tensor& gate, const Tensor& up, const Tensor& dout, const Tensor& dgate, const Tensor& dup) {
  MOE_CUDA_CHECK_COMPUTE_DTYPE("swiglu_bwd", "gate", gate);
  MOE_CUDA_CHECK_SAME_DTYPE("swiglu_bwd", "up", up, "gate", gate);
  MOE_CUDA_CHECK_SAME_DTYPE("swiglu_bwd", "dout", dout, "gate", gate);
  MOE_CUDA_CHECK_SAME_DTYPE("swiglu_bwd", "dgate", dgate, "gate", gate);
  MOE_CUDA_CHECK_SAME_DTYPE("swiglu_bwd", "dup", dup, "gate", gate);
  if (gate.numel() == 0) return;
  MOE_CUDA_CHECK(launch::swiglu_bwd(gate.raw_data(), up.raw_data(), dout.raw_data(), dgate.raw_data(), dup.raw_data(),
                                    gate.dtype(), gate.numel(), stream_of(gate)));
}

void cross_entropy_fwd(const Tensor& logits, const Tensor& targets, const Tensor& losses, const Tensor& lse) {
  const int64_t n = logits.dim(0);
  if (n == 0) return;
  check_row_grid("cross_entropy_fwd", n);
  MOE_CUDA_CHECK_COMPUTE_DTYPE("cross_entropy_fwd", "logits", logits);
  MOE_CUDA_CHECK(launch::cross_entropy_fwd(logits.raw_data(), logits.dtype(), targets.data<int32_t>(),
                                           losses.data<float>(), lse.data<float>(), n, logits.dim(1),
                                           stream_of(logits)));
}

void cross_entropy_partial_fwd(const Tensor& logits, const Tensor& targets, int64_t vocab_start, int64_t valid_cols,
                               const Tensor& partial) {
  const int64_t n = logits.dim(0);
  if (n == 0) return;
  check_row_grid("cross_entropy_partial_fwd", n);
  MOE_CUDA_CHECK_COMPUTE_DTYPE("cross_entropy_partial_fwd", "logits", logits);
  MOE_CUDA_CHECK(launch::cross_entropy_partial_fwd(logits.raw_data(), logits.dtype(), targets.data<int32_t>(), n,
                                                   logits.dim(1), vocab_start, valid_cols, partial.data<float>(),
                                                   stream_of(logits)));
}

void cross_entropy_combine(const Tensor& partials, const Tensor& targets, int64_t vocab_size, const Tensor& losses,
                           const Tensor& lse) {
  const int64_t n = partials.dim(1);
  if (n == 0) return;
  MOE_CUDA_CHECK(launch::cross_entropy_combine(partials.data<float>(), targets.data<int32_t>(), partials.dim(0), n,
                                               vocab_size, losses.data<float>(), lse.data<float>(),
                                               stream_of(partials)));
}

void cross_entropy_bwd(const Tensor& logits, const Tensor& targets, const Tensor& lse, float scale,
                       const Tensor& dlogits, int64_t vocab_start, int64_t valid_cols) {
  const int64_t n = logits.dim(0);
  if (n == 0) return;
  check_row_grid("cross_entropy_bwd", n);
  MOE_CUDA_CHECK_COMPUTE_DTYPE("cross_entropy_bwd", "logits", logits);
  MOE_CUDA_CHECK_SAME_DTYPE("cross_entropy_bwd", "dlogits", dlogits, "logits", logits);
  MOE_CUDA_CHECK(launch::cross_entropy_bwd(logits.raw_data(), logits.dtype(), targets.data<int32_t>(),
                                           lse.data<float>(), scale, dlogits.raw_data(), n, logits.dim(1),
                                           vocab_start, valid_cols, stream_of(logits)));
}

namespace {
launch::AttentionDims attention_dims(const char* op, const Tensor& q, const Tensor& k) {
  const launch::AttentionDims d{q.dim(0), q.dim(1), q.dim(2), k.dim(2), q.dim(3)};
  MOE_CHECK(d.D <= launch::kAttentionMaxHeadDim, "{}: head dim {} of q {} exceeds the CUDA kernel's maximum of {}",
            op, d.D, q.shape().str(), launch::kAttentionMaxHeadDim);
  MOE_CHECK(d.B * d.H * d.T / 4 < (int64_t{1} << 31), "{}: q {} has too many rows for the CUDA grid", op,
            q.shape().str());
  return d;
}
}  // namespace

namespace {

// The fused kernels' options for a mask. With documents they run on the rows flattened (packed
// sequences: q (B * T, H, D), the same memory) and keep lse as (H, B * T).
FlashOptions flash_options(const ops::AttentionMask& mask) {
  return {mask.window, mask.cu_seqlens, mask.max_seqlen};
}

// q-like (B, T, X, D) as (B * T, X, D): a view.
Tensor packed(const Tensor& t) { return t.reshape({t.dim(0) * t.dim(1), t.dim(2), t.dim(3)}); }

// lse (B, H, T) <-> the packed kernels' (H, B * T): one strided copy per row b.
void repack_lse(const Tensor& from, const Tensor& to, bool to_packed) {
  const Tensor& dense = to_packed ? from : to;
  const int64_t B = dense.dim(0), H = dense.dim(1), T = dense.dim(2);
  const size_t row = static_cast<size_t>(T) * sizeof(float);
  for (int64_t b = 0; b < B; ++b) {
    float* d = to.data<float>() + (to_packed ? b * T : b * H * T);
    const float* s = from.data<float>() + (to_packed ? b * H * T : b * T);
    MOE_CUDA_CHECK(cudaMemcpy2DAsync(d, to_packed ? B * row : row, s, to_packed ? row : B * row, row,
                                     static_cast<size_t>(H), cudaMemcpyDeviceToDevice, stream_of(from)));
  }
}

void check_f32_mask(const char* op, const ops::AttentionMask& mask) {
  MOE_CHECK(mask.plain(),
            "{}: the f32 CUDA attention takes plain causal attention only; a window or packed documents run on the "
            "fused bf16 kernels (train.precision: BF16)",
            op);
}

}  // namespace

void attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v, float scale, const Tensor& out,
                   const Tensor& lse, const ops::AttentionMask& mask) {
  if (q.dtype() == DType::kBF16) {
    if (!mask.cu_seqlens.defined()) return flash_attention_fwd(q, k, v, scale, out, lse, flash_options(mask));
    const int64_t B = q.dim(0), H = q.dim(2), T = q.dim(1);
    const Tensor lse_packed = B == 1 ? lse.reshape({H, T}) : Tensor::empty({H, B * T}, DType::kF32, q.device());
    flash_attention_fwd(packed(q), packed(k), packed(v), scale, packed(out), lse_packed, flash_options(mask));
    if (B > 1) repack_lse(lse_packed, lse, /*to_packed=*/false);
    return;
  }
  check_f32_mask("attention_fwd", mask);
  const launch::AttentionDims d = attention_dims("attention_fwd", q, k);
  if (d.B * d.H * d.T == 0) return;
  MOE_CUDA_CHECK(launch::attention_fwd(d, q.data<float>(), k.data<float>(), v.data<float>(), scale, out.data<float>(),
                                       lse.data<float>(), stream_of(q)));
}

void attention_bwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                   const Tensor& dout, float scale, const Tensor& dq, const Tensor& dk, const Tensor& dv,
                   const ops::AttentionMask& mask) {
  if (q.dtype() == DType::kBF16) {
    if (!mask.cu_seqlens.defined())
      return flash_attention_bwd(q, k, v, out, lse, dout, scale, dq, dk, dv, flash_options(mask));
    const int64_t B = q.dim(0), H = q.dim(2), T = q.dim(1);
    Tensor lse_packed = lse.reshape({H, T});
    if (B > 1) {
      lse_packed = Tensor::empty({H, B * T}, DType::kF32, q.device());
      repack_lse(lse, lse_packed, /*to_packed=*/true);
    }
    flash_attention_bwd(packed(q), packed(k), packed(v), packed(out), lse_packed, packed(dout), scale, packed(dq),
                        packed(dk), packed(dv), flash_options(mask));
    return;
  }
  check_f32_mask("attention_bwd", mask);
  const launch::AttentionDims d = attention_dims("attention_bwd", q, k);
  if (d.B * d.H * d.T == 0) return;
  const Tensor delta = Tensor::empty({d.B, d.H, d.T}, DType::kF32, q.device());
  MOE_CUDA_CHECK(launch::attention_bwd(d, q.data<float>(), k.data<float>(), v.data<float>(), out.data<float>(),
                                       lse.data<float>(), dout.data<float>(), scale, dq.data<float>(), dk.data<float>(),
                                       dv.data<float>(), delta.data<float>(), stream_of(q)));
}

}  // namespace moeforge::cuda
