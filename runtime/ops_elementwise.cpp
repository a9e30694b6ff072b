// Validation and dispatch of the elementwise ops and GEMM.
#include "runtime/cpu/elementwise.h"
#include "runtime/op_checks.h"
#include "runtime/ops.h"

namespace moeforge::ops {

using detail::check_dtype;
using detail::check_float;
using detail::check_same_device;
using detail::check_same_dtype;
using detail::check_same_shape;
using detail::matrix_cols;
using detail::matrix_rows;
using detail::Widened;

void fill(const Tensor& t, float value) {
  const Device dev = check_same_device("fill", {{"t", t}});
  MOE_DISPATCH(fill, dev, t, value);
}

void copy(const Tensor& src, const Tensor& dst) {
  const Device dev = check_same_device("copy", {{"src", src}, {"dst", dst}});
  check_same_shape("copy", {"dst", dst}, {"src", src});
  check_dtype("copy", {"dst", dst}, src.dtype());
  MOE_DISPATCH(copy, dev, src, dst);
}

void cast(const Tensor& src, const Tensor& dst) {
  const Device dev = check_same_device("cast", {{"src", src}, {"dst", dst}});
  check_float("cast", {"src", src});
  check_float("cast", {"dst", dst});
  check_same_shape("cast", {"dst", dst}, {"src", src});
  MOE_DISPATCH(cast, dev, src, dst);
}

void add(const Tensor& a, const Tensor& b, const Tensor& out) {
  const Device dev = check_same_device("add", {{"a", a}, {"b", b}, {"out", out}});
  check_float("add", {"a", a});
  check_same_dtype("add", {"b", b}, {"a", a});
  check_same_dtype("add", {"out", out}, {"a", a});
  check_same_shape("add", {"b", b}, {"a", a});
  check_same_shape("add", {"out", out}, {"a", a});
  const Widened wa(a, Widened::kIn), wb(b, Widened::kIn), wo(out, Widened::kOut);
  MOE_DISPATCH(add, dev, wa.f32(), wb.f32(), wo.f32());
  wo.finish();
}

void add_(const Tensor& dst, const Tensor& src, float alpha) {
  const Device dev = check_same_device("add_", {{"dst", dst}, {"src", src}});
  check_float("add_", {"dst", dst});
  check_float("add_", {"src", src});
  check_same_shape("add_", {"src", src}, {"dst", dst});
  const Widened wd(dst, Widened::kInOut), ws(src, Widened::kIn);
  MOE_DISPATCH(add_, dev, wd.f32(), ws.f32(), alpha);
  wd.finish();
}

void scale_(const Tensor& t, float alpha) {
  const Device dev = check_same_device("scale_", {{"t", t}});
  check_float("scale_", {"t", t});
  const Widened wt(t, Widened::kInOut);
  MOE_DISPATCH(scale_, dev, wt.f32(), alpha);
  wt.finish();
}

double sum_squares(const Tensor& t) {
  const Device dev = check_same_device("sum_squares", {{"t", t}});
  check_float("sum_squares", {"t", t});
  const Widened wt(t, Widened::kIn);
  return MOE_DISPATCH_VALUE(sum_squares, dev, wt.f32());
}

void gemm(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, const Tensor& c, bool accumulate,
          float alpha) {
  const Device dev = check_same_device("gemm", {{"a", a}, {"b", b}, {"c", c}});
  // a and b f32 -> c f32; a and b bf16 -> c bf16 or f32 (fp32 accumulation either way).
  check_float("gemm", {"a", a});
  check_same_dtype("gemm", {"b", b}, {"a", a});
  if (a.dtype() == DType::kF32) check_dtype("gemm", {"c", c}, DType::kF32);
  else check_float("gemm", {"c", c});
  MOE_CHECK(a.ndim() >= 1 && b.ndim() >= 1 && c.ndim() >= 1, "gemm: operands need at least 1 dim, got a {} b {} c {}",
            a.shape().str(), b.shape().str(), c.shape().str());
  const int64_t m = trans_a ? matrix_cols(a) : matrix_rows(a);
  const int64_t ka = trans_a ? matrix_rows(a) : matrix_cols(a);
  const int64_t kb = trans_b ? matrix_cols(b) : matrix_rows(b);
  const int64_t n = trans_b ? matrix_rows(b) : matrix_cols(b);
  MOE_CHECK(ka == kb, "gemm: inner dimensions differ: op(a) of a {} is ({}, {}) (trans_a={}), op(b) of b {} is ({}, {}) (trans_b={})",
            a.shape().str(), m, ka, trans_a, b.shape().str(), kb, n, trans_b);
  MOE_CHECK(matrix_rows(c) == m && matrix_cols(c) == n,
            "gemm: c has shape {} (as matrix ({}, {})) but op(a)·op(b) of a {} and b {} is ({}, {})", c.shape().str(),
            matrix_rows(c), matrix_cols(c), a.shape().str(), b.shape().str(), m, n);
  if (dev.is_cpu()) {  // the CPU's sgemm on widened operands; cuBLASLt takes bf16 itself
    const Widened wa(a, Widened::kIn), wb(b, Widened::kIn), wc(c, accumulate ? Widened::kInOut : Widened::kOut);
    cpu::gemm(wa.f32(), trans_a, wb.f32(), trans_b, wc.f32(), accumulate, alpha);
    wc.finish();
    return;
  }
  MOE_DISPATCH(gemm, dev, a, trans_a, b, trans_b, c, accumulate, alpha);
}

}  // namespace moeforge::ops
