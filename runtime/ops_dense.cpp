// Validation and dispatch of the dense per-token ops: embedding, RMSNorm, RoPE, SwiGLU and the
// cross-entropy (fused, and vocab-parallel). Index values (ids, targets) are range-checked by the
// kernels, which are the only code that reads them.
#include <cmath>

#include "runtime/cpu/dense.h"
#include "runtime/op_checks.h"
#include "runtime/ops.h"

namespace moeforge::ops {

using detail::check_dtype;
using detail::check_float;
using detail::check_ndim;
using detail::check_same_device;
using detail::check_same_dtype;
using detail::check_same_shape;
using detail::check_shape;
using detail::matrix_rows;
using detail::NamedTensor;
using detail::Widened;

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
  check_float(op, {"logits", logits});
  check_dtype(op, {"targets", targets}, DType::kI32);
  check_ndim(op, {"logits", logits}, 2);
  MOE_CHECK(logits.dim(1) > 0, "{}: logits must have at least one column, got shape {}", op, logits.shape().str());
  check_shape(op, {"targets", targets}, {logits.dim(0)}, {"logits", logits});
}

// The vocabulary slice a table holds: vocab_start >= 0, and vocab_size >= 1, or -1 when the table
// is the whole vocabulary (which then starts at 0). Returns the vocabulary size the ids are
// checked against.
int64_t check_vocab_slice(const char* op, const Tensor& table, int64_t vocab_start, int64_t vocab_size) {
  MOE_CHECK(vocab_start >= 0, "{}: vocab_start={} must be >= 0", op, vocab_start);
  if (vocab_size == -1) {
    MOE_CHECK(vocab_start == 0, "{}: vocab_size=-1 (the table is the whole vocabulary) needs vocab_start=0, got {}",
              op, vocab_start);
    return table.dim(0);
  }
  MOE_CHECK(vocab_size >= 1, "{}: vocab_size={} must be >= 1, or -1 for the whole table", op, vocab_size);
  return vocab_size;
}

// The vocabulary columns a logits shard (N, Vl) holds: vocab_start >= 0, valid_cols in [0, Vl].
void check_logits_shard(const char* op, const Tensor& logits, int64_t vocab_start, int64_t valid_cols) {
  MOE_CHECK(vocab_start >= 0, "{}: vocab_start={} must be >= 0", op, vocab_start);
  MOE_CHECK(valid_cols >= 0 && valid_cols <= logits.dim(1),
            "{}: valid_cols={} must be in [0, {}], the columns of logits of shape {}", op, valid_cols, logits.dim(1),
            logits.shape().str());
}

}  // namespace

void embedding_fwd(const Tensor& ids, const Tensor& table, const Tensor& out, int64_t vocab_start,
                   int64_t vocab_size) {
  const char* op = "embedding_fwd";
  const Device dev = check_same_device(op, {{"ids", ids}, {"table", table}, {"out", out}});
  check_dtype(op, {"ids", ids}, DType::kI32);
  check_float(op, {"table", table});
  check_float(op, {"out", out});
  check_ndim(op, {"ids", ids}, 1);
  check_ndim(op, {"table", table}, 2);
  check_rows(op, {"out", out}, {"ids", ids}, {"table", table});
  const int64_t vocab = check_vocab_slice(op, table, vocab_start, vocab_size);
  const Widened wt(table, Widened::kIn), wo(out, Widened::kOut);
  MOE_DISPATCH(embedding_fwd, dev, ids, wt.f32(), wo.f32(), vocab_start, vocab);
  wo.finish();
}

void embedding_bwd(const Tensor& ids, const Tensor& dout, const Tensor& dtable, int64_t vocab_start,
                   int64_t vocab_size) {
  const char* op = "embedding_bwd";
  const Device dev = check_same_device(op, {{"ids", ids}, {"dout", dout}, {"dtable", dtable}});
  check_dtype(op, {"ids", ids}, DType::kI32);
  check_float(op, {"dout", dout});
  check_float(op, {"dtable", dtable});
  check_ndim(op, {"ids", ids}, 1);
  check_ndim(op, {"dtable", dtable}, 2);
  check_rows(op, {"dout", dout}, {"ids", ids}, {"dtable", dtable});
  const int64_t vocab = check_vocab_slice(op, dtable, vocab_start, vocab_size);
  const Widened wd(dout, Widened::kIn), wt(dtable, Widened::kInOut);
  MOE_DISPATCH(embedding_bwd, dev, ids, wd.f32(), wt.f32(), vocab_start, vocab);
  wt.finish();
}

void rmsnorm_fwd(const Tensor& x, const Tensor& w, float eps, const Tensor& out, const Tensor& rstd) {
  const char* op = "rmsnorm_fwd";
  const Device dev = check_same_device(op, {{"x", x}, {"w", w}, {"out", out}, {"rstd", rstd}});
  check_float(op, {"x", x});
  check_float(op, {"w", w});
  check_same_dtype(op, {"out", out}, {"x", x});
  check_dtype(op, {"rstd", rstd}, DType::kF32);
  const int64_t c = check_norm_input(op, {"x", x});
  check_shape(op, {"w", w}, {c}, {"x", x});
  check_same_shape(op, {"out", out}, {"x", x});
  check_shape(op, {"rstd", rstd}, {matrix_rows(x)}, {"x", x});
  MOE_CHECK(std::isfinite(eps) && eps > 0.0f, "{}: eps must be a positive finite number, got {}", op, eps);
  const Widened wx(x, Widened::kIn), ww(w, Widened::kIn), wo(out, Widened::kOut);
  MOE_DISPATCH(rmsnorm_fwd, dev, wx.f32(), ww.f32(), eps, wo.f32(), rstd);
  wo.finish();
}

void rmsnorm_bwd(const Tensor& x, const Tensor& w, const Tensor& rstd, const Tensor& dout, const Tensor& dx,
                 const Tensor& dw) {
  const char* op = "rmsnorm_bwd";
  const Device dev = check_same_device(
      op, {{"x", x}, {"w", w}, {"rstd", rstd}, {"dout", dout}, {"dx", dx}, {"dw", dw}});
  check_float(op, {"x", x});
  check_float(op, {"w", w});
  check_dtype(op, {"rstd", rstd}, DType::kF32);
  check_same_dtype(op, {"dout", dout}, {"x", x});
  check_same_dtype(op, {"dx", dx}, {"x", x});
  check_float(op, {"dw", dw});
  const int64_t c = check_norm_input(op, {"x", x});
  check_shape(op, {"w", w}, {c}, {"x", x});
  check_shape(op, {"rstd", rstd}, {matrix_rows(x)}, {"x", x});
  check_same_shape(op, {"dout", dout}, {"x", x});
  check_same_shape(op, {"dx", dx}, {"x", x});
  check_same_shape(op, {"dw", dw}, {"w", w});
  const Widened wx(x, Widened::kIn), ww(w, Widened::kIn), wd(dout, Widened::kIn), wdx(dx, Widened::kOut),
      wdw(dw, Widened::kInOut);
  MOE_DISPATCH(rmsnorm_bwd, dev, wx.f32(), ww.f32(), rstd, wd.f32(), wdx.f32(), wdw.f32());
  wdx.finish();
  wdw.finish();
}

void rope_fwd(const Tensor& x, float theta, const Tensor& out) {
  const char* op = "rope_fwd";
  const Device dev = check_same_device(op, {{"x", x}, {"out", out}});
  check_float(op, {"x", x});
  check_same_dtype(op, {"out", out}, {"x", x});
  check_rope_input(op, {"x", x}, theta);
  check_same_shape(op, {"out", out}, {"x", x});
  const Widened wx(x, Widened::kIn), wo(out, Widened::kOut);
  MOE_DISPATCH(rope_fwd, dev, wx.f32(), theta, wo.f32());
  wo.finish();
}

void rope_bwd(const Tensor& dout, float theta, const Tensor& dx) {
  const char* op = "rope_bwd";
  const Device dev = check_same_device(op, {{"dout", dout}, {"dx", dx}});
  check_float(op, {"dout", dout});
  check_same_dtype(op, {"dx", dx}, {"dout", dout});
  check_rope_input(op, {"dout", dout}, theta);
  check_same_shape(op, {"dx", dx}, {"dout", dout});
  const Widened wd(dout, Widened::kIn), wx(dx, Widened::kOut);
  MOE_DISPATCH(rope_bwd, dev, wd.f32(), theta, wx.f32());
  wx.finish();
}

void swiglu_fwd(const Tensor& gate, const Tensor& up, const Tensor& out) {
  const char* op = "swiglu_fwd";
  const Device dev = check_same_device(op, {{"gate", gate}, {"up", up}, {"out", out}});
  check_float(op, {"gate", gate});
  check_same_dtype(op, {"up", up}, {"gate", gate});
  check_same_dtype(op, {"out", out}, {"gate", gate});
  check_same_shape(op, {"up", up}, {"gate", gate});
  check_same_shape(op, {"out", out}, {"gate", gate});
  const Widened wg(gate, Widened::kIn), wu(up, Widened::kIn), wo(out, Widened::kOut);
  MOE_DISPATCH(swiglu_fwd, dev, wg.f32(), wu.f32(), wo.f32());
  wo.finish();
}

void swiglu_bwd(const Tensor& gate, const Tensor& up, const Tensor& dout, const Tensor& dgate, const Tensor& dup) {
  const char* op = "swiglu_bwd";
  const Device dev = check_same_device(
      op, {{"gate", gate}, {"up", up}, {"dout", dout}, {"dgate", dgate}, {"dup", dup}});
  check_float(op, {"gate", gate});
  check_same_dtype(op, {"up", up}, {"gate", gate});
  check_same_dtype(op, {"dout", dout}, {"gate", gate});
  check_same_dtype(op, {"dgate", dgate}, {"gate", gate});
  check_same_dtype(op, {"dup", dup}, {"gate", gate});
  check_same_shape(op, {"up", up}, {"gate", gate});
  check_same_shape(op, {"dout", dout}, {"gate", gate});
  check_same_shape(op, {"dgate", dgate}, {"gate", gate});
  check_same_shape(op, {"dup", dup}, {"gate", gate});
  const Widened wg(gate, Widened::kIn), wu(up, Widened::kIn), wd(dout, Widened::kIn), wdg(dgate, Widened::kOut),
      wdu(dup, Widened::kOut);
  MOE_DISPATCH(swiglu_bwd, dev, wg.f32(), wu.f32(), wd.f32(), wdg.f32(), wdu.f32());
  wdg.finish();
  wdu.finish();
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
  const Widened wl(logits, Widened::kIn);
  MOE_DISPATCH(cross_entropy_fwd, dev, wl.f32(), targets, losses, lse);
}

void cross_entropy_partial_fwd(const Tensor& logits, const Tensor& targets, int64_t vocab_start, int64_t valid_cols,
                               const Tensor& partial) {
  const char* op = "cross_entropy_partial_fwd";
  const Device dev = check_same_device(op, {{"logits", logits}, {"targets", targets}, {"partial", partial}});
  check_logits_targets(op, logits, targets);
  check_logits_shard(op, logits, vocab_start, valid_cols);
  check_dtype(op, {"partial", partial}, DType::kF32);
  check_shape(op, {"partial", partial}, {logits.dim(0), 3}, {"logits", logits});
  const Widened wl(logits, Widened::kIn);
  MOE_DISPATCH(cross_entropy_partial_fwd, dev, wl.f32(), targets, vocab_start, valid_cols, partial);
}

void cross_entropy_combine(const Tensor& partials, const Tensor& targets, int64_t vocab_size, const Tensor& losses,
                           const Tensor& lse) {
  const char* op = "cross_entropy_combine";
  const Device dev = check_same_device(
      op, {{"partials", partials}, {"targets", targets}, {"losses", losses}, {"lse", lse}});
  check_dtype(op, {"partials", partials}, DType::kF32);
  check_dtype(op, {"targets", targets}, DType::kI32);
  check_dtype(op, {"losses", losses}, DType::kF32);
  check_dtype(op, {"lse", lse}, DType::kF32);
  check_ndim(op, {"targets", targets}, 1);
  check_ndim(op, {"partials", partials}, 3);
  const int64_t n = targets.dim(0);
  MOE_CHECK(partials.dim(0) >= 1, "{}: partials has shape {}; expected the partials of at least one shard", op,
            partials.shape().str());
  check_shape(op, {"partials", partials}, {partials.dim(0), n, 3}, {"targets", targets});
  check_shape(op, {"losses", losses}, {n}, {"targets", targets});
  check_shape(op, {"lse", lse}, {n}, {"targets", targets});
  MOE_CHECK(vocab_size >= 1, "{}: vocab_size={} must be >= 1", op, vocab_size);
  MOE_DISPATCH(cross_entropy_combine, dev, partials, targets, vocab_size, losses, lse);
}

void cross_entropy_bwd(const Tensor& logits, const Tensor& targets, const Tensor& lse, float scale,
                       const Tensor& dlogits, int64_t vocab_start, int64_t valid_cols) {
  const char* op = "cross_entropy_bwd";
  const Device dev = check_same_device(
      op, {{"logits", logits}, {"targets", targets}, {"lse", lse}, {"dlogits", dlogits}});
  check_logits_targets(op, logits, targets);
  if (valid_cols == -1) {
    MOE_CHECK(vocab_start == 0,
              "{}: valid_cols=-1 (the logits are the whole vocabulary) needs vocab_start=0, got {}", op,
              vocab_start);
  } else {
    check_logits_shard(op, logits, vocab_start, valid_cols);
  }
  check_dtype(op, {"lse", lse}, DType::kF32);
  check_same_dtype(op, {"dlogits", dlogits}, {"logits", logits});
  check_shape(op, {"lse", lse}, {logits.dim(0)}, {"logits", logits});
  check_same_shape(op, {"dlogits", dlogits}, {"logits", logits});
  // bf16: the widened logits are a copy, so dlogits may still alias logits.
  const Widened wl(logits, Widened::kIn), wd(dlogits, Widened::kOut);
  MOE_DISPATCH(cross_entropy_bwd, dev, wl.f32(), targets, lse, scale, wd.f32(), vocab_start, valid_cols);
  wd.finish();
}

}  // namespace moeforge::ops
