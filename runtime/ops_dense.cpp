// Validation and dispatch of the dense per-token ops: embedding, RMSNorm, RoPE, SwiGLU and the
// fused cross-entropy. Index values (ids, targets) are range-checked by the kernels, which are
// the only code that reads them.
#include <cmath>

#include "runtime/cpu/dense.h"
#include "runtime/op_checks.h"
#include "runtime/ops.h"

namespace moeforge::ops {

using detail::check_dtype;
using detail::check_ndim;
using detail::check_same_device;
using detail::check_same_shape;
using detail::check_shape;
using detail::matrix_rows;
using detail::NamedTensor;

namespace {

// rows (N, C) of a lookup result: N comes from `ids`, C from `table`; the error names whichever
// of the two disagrees with t.
void check_rows(const char* op, NamedTensor t, NamedTensor ids, NamedTensor table) {
  const int64_t n = ids.t.dim(0);
  const int64_t c = table.t.dim(1);
  const bool rows_match = t.t.ndim() == 2 && t.t.dim(0) == n;
  check_shape(op, t, {n, c}, rows_match ? table : ids);
}

// x (..., C) with C >= 1; returns C.
int64_t check_norm_input(const char* op, NamedTensor x) {
  MOE_CHECK(x.t.ndim() >= 1 && x.t.dim(-1) > 0,
            "{}: {} must have at least 1 dim and a non-empty last dim, got shape {}", op, x.name, x.t.shape().str());
  return x.t.dim(-1);
}

// x (B, T, H, D) with D even, theta a positive finite base.
void check_rope_input(const char* op, NamedTensor x, float theta) {
  check_ndim(op, x, 4);
  MOE_CHECK(x.t.dim(3) % 2 == 0, "{}: the head dim D of {} must be even, got {} of shape {}", op, x.name, x.name,
            x.t.shape().str());
  MOE_CHECK(std::isfinite(theta) && theta > 0.0f, "{}: theta must be a positive finite number, got {}", op, theta);
}

// logits (N, V) with V >= 1; targets (N) i32.
void check_logits_targets(const char* op, const Tensor& logits, const Tensor& targets) {
  check_dtype(op, {"logits", logits}, DType::kF32);
  check_dtype(op, {"targets", targets}, DType::kI32);
  check_ndim(op, {"logits", logits}, 2);
  MOE_CHECK(logits.dim(1) > 0, "{}: logits must have at least one column, got shape {}", op, logits.shape().str());
  check_shape(op, {"targets", targets}, {logits.dim(0)}, {"logits", logits});
}

}  // namespace

void embedding_fwd(const Tensor& ids, const Tensor& table, const Tensor& out) {
  const char* op = "embedding_fwd";
  const Device dev = check_same_device(op, {{"ids", ids}, {"table", table}, {"out", out}});
  check_dtype(op, {"ids", ids}, DType::kI32);
  check_dtype(op, {"table", table}, DType::kF32);
  check_dtype(op, {"out", out}, DType::kF32);
  check_ndim(op, {"ids", ids}, 1);
  check_ndim(op, {"table", table}, 2);
  check_rows(op, {"out", out}, {"ids", ids}, {"table", table});
  MOE_DISPATCH(embedding_fwd, dev, ids, table, out);
}

void embedding_bwd(const Tensor& ids, const Tensor& dout, const Tensor& dtable) {
  const char* op = "embedding_bwd";
  const Device dev = check_same_device(op, {{"ids", ids}, {"dout", dout}, {"dtable", dtable}});
  check_dtype(op, {"ids", ids}, DType::kI32);
  check_dtype(op, {"dout", dout}, DType::kF32);
  check_dtype(op, {"dtable", dtable}, DType::kF32);
  check_ndim(op, {"ids", ids}, 1);
  check_ndim(op, {"dtable", dtable}, 2);
  check_rows(op, {"dout", dout}, {"ids", ids}, {"dtable", dtable});
  MOE_DISPATCH(embedding_bwd, dev, ids, dout, dtable);
}

void rmsnorm_fwd(const Tensor& x, const Tensor& w, float eps, const Tensor& out, const Tensor& rstd) {
  const char* op = "rmsnorm_fwd";
  const Device dev = check_same_device(op, {{"x", x}, {"w", w}, {"out", out}, {"rstd", rstd}});
  check_dtype(op, {"x", x}, DType::kF32);
  check_dtype(op, {"w", w}, DType::kF32);
  check_dtype(op, {"out", out}, DType::kF32);
  check_dtype(op, {"rstd", rstd}, DType::kF32);
  const int64_t c = check_norm_input(op, {"x", x});
  check_shape(op, {"w", w}, {c}, {"x", x});
  check_same_shape(op, {"out", out}, {"x", x});
  check_shape(op, {"rstd", rstd}, {matrix_rows(x)}, {"x", x});
  MOE_CHECK(std::isfinite(eps) && eps > 0.0f, "{}: eps must be a positive finite number, got {}", op, eps);
  MOE_DISPATCH(rmsnorm_fwd, dev, x, w, eps, out, rstd);
}

void rmsnorm_bwd(const Tensor& x, const Tensor& w, const Tensor& rstd, const Tensor& dout, const Tensor& dx,
                 const Tensor& dw) {
  const char* op = "rmsnorm_bwd";
  const Device dev = check_same_device(
      op, {{"x", x}, {"w", w}, {"rstd", rstd}, {"dout", dout}, {"dx", dx}, {"dw", dw}});
  check_dtype(op, {"x", x}, DType::kF32);
  check_dtype(op, {"w", w}, DType::kF32);
  check_dtype(op, {"rstd", rstd}, DType::kF32);
  check_dtype(op, {"dout", dout}, DType::kF32);
  check_dtype(op, {"dx", dx}, DType::kF32);
  check_dtype(op, {"dw", dw}, DType::kF32);
  const int64_t c = check_norm_input(op, {"x", x});
  check_shape(op, {"w", w}, {c}, {"x", x});
  check_shape(op, {"rstd", rstd}, {matrix_rows(x)}, {"x", x});
  check_same_shape(op, {"dout", dout}, {"x", x});
  check_same_shape(op, {"dx", dx}, {"x", x});
  check_same_shape(op, {"dw", dw}, {"w", w});
  MOE_DISPATCH(rmsnorm_bwd, dev, x, w, rstd, dout, dx, dw);
}

void rope_fwd(const Tensor& x, float theta, const Tensor& out) {
  const char* op = "rope_fwd";
  const Device dev = check_same_device(op, {{"x", x}, {"out", out}});
  check_dtype(op, {"x", x}, DType::kF32);
  check_dtype(op, {"out", out}, DType::kF32);
  check_rope_input(op, {"x", x}, theta);
  check_same_shape(op, {"out", out}, {"x", x});
  MOE_DISPATCH(rope_fwd, dev, x, theta, out);
}

void rope_bwd(const Tensor& dout, float theta, const Tensor& dx) {
  const char* op = "rope_bwd";
  const Device dev = check_same_device(op, {{"dout", dout}, {"dx", dx}});
  check_dtype(op, {"dout", dout}, DType::kF32);
  check_dtype(op, {"dx", dx}, DType::kF32);
  check_rope_input(op, {"dout", dout}, theta);
  check_same_shape(op, {"dx", dx}, {"dout", dout});
  MOE_DISPATCH(rope_bwd, dev, dout, theta, dx);
}

void swiglu_fwd(const Tensor& gate, const Tensor& up, const Tensor& out) {
  const char* op = "swiglu_fwd";
  const Device dev = check_same_device(op, {{"gate", gate}, {"up", up}, {"out", out}});
  check_dtype(op, {"gate", gate}, DType::kF32);
  check_dtype(op, {"up", up}, DType::kF32);
  check_dtype(op, {"out", out}, DType::kF32);
  check_same_shape(op, {"up", up}, {"gate", gate});
  check_same_shape(op, {"out", out}, {"gate", gate});
  MOE_DISPATCH(swiglu_fwd, dev, gate, up, out);
}

void swiglu_bwd(const Tensor& gate, const Tensor& up, const Tensor& dout, const Tensor& dgate, const Tensor& dup) {
  const char* op = "swiglu_bwd";
  const Device dev = check_same_device(
      op, {{"gate", gate}, {"up", up}, {"dout", dout}, {"dgate", dgate}, {"dup", dup}});
  check_dtype(op, {"gate", gate}, DType::kF32);
  check_dtype(op, {"up", up}, DType::kF32);
  check_dtype(op, {"dout", dout}, DType::kF32);
  check_dtype(op, {"dgate", dgate}, DType::kF32);
  check_dtype(op, {"dup", dup}, DType::kF32);
  check_same_shape(op, {"up", up}, {"gate", gate});
  check_same_shape(op, {"dout", dout}, {"gate", gate});
  check_same_shape(op, {"dgate", dgate}, {"gate", gate});
  check_same_shape(op, {"dup", dup}, {"gate", gate});
  MOE_DISPATCH(swiglu_bwd, dev, gate, up, dout, dgate, dup);
}

void cross_entropy_fwd(const Tensor& logits, const Tensor& targets, const Tensor& losses, const Tensor& lse) {
  const char* op = "cross_entropy_fwd";
  const Device dev = check_same_device(
      op, {{"logits", logits}, {"targets", targets}, {"losses", losses}, {"lse", lse}});
  check_logits_targets(op, logits, targets);
  check_dtype(op, {"losses", losses}, DType::kF32);
  check_dtype(op, {"lse", lse}, DType::kF32);
  check_shape(op, {"losses", losses}, {logits.dim(0)}, {"logits", logits});
  check_shape(op, {"lse", lse}, {logits.dim(0)}, {"logits", logits});
  MOE_DISPATCH(cross_entropy_fwd, dev, logits, targets, losses, lse);
}

void cross_entropy_bwd(const Tensor& logits, const Tensor& targets, const Tensor& lse, float scale,
                       const Tensor& dlogits) {
  const char* op = "cross_entropy_bwd";
  const Device dev = check_same_device(
      op, {{"logits", logits}, {"targets", targets}, {"lse", lse}, {"dlogits", dlogits}});
  check_logits_targets(op, logits, targets);
  check_dtype(op, {"lse", lse}, DType::kF32);
  check_dtype(op, {"dlogits", dlogits}, DType::kF32);
  check_shape(op, {"lse", lse}, {logits.dim(0)}, {"logits", logits});
  check_same_shape(op, {"dlogits", dlogits}, {"logits", logits});
  MOE_DISPATCH(cross_entropy_bwd, dev, logits, targets, lse, scale, dlogits);
}

}  // namespace moeforge::ops
