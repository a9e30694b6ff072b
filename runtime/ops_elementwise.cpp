// Validation and dispatch of the elementwise ops and GEMM.
#include "runtime/cpu/elementwise.h"
#include "runtime/op_checks.h"
#include "runtime/ops.h"

namespace moeforge::ops {

using detail::check_dtype;
using detail::check_same_device;
using detail::check_same_shape;
using detail::matrix_cols;
using detail::matrix_rows;

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

void add(const Tensor& a, const Tensor& b, const Tensor& out) {
  const Device dev = check_same_device("add", {{"a", a}, {"b", b}, {"out", out}});
  check_dtype("add", {"a", a}, DType::kF32);
  check_dtype("add", {"b", b}, DType::kF32);
  check_dtype("add", {"out", out}, DType::kF32);
  check_same_shape("add", {"b", b}, {"a", a});
  check_same_shape("add", {"out", out}, {"a", a});
  MOE_DISPATCH(add, dev, a, b, out);
}

void add_(const Tensor& dst, const Tensor& src, float alpha) {
  const Device dev = check_same_device("add_", {{"dst", dst}, {"src", src}});
  check_dtype("add_", {"dst", dst}, DType::kF32);
  check_dtype("add_", {"src", src}, DType::kF32);
  check_same_shape("add_", {"src", src}, {"dst", dst});
  MOE_DISPATCH(add_, dev, dst, src, alpha);
}

void scale_(const Tensor& t, float alpha) {
  const Device dev = check_same_device("scale_", {{"t", t}});
  check_dtype("scale_", {"t", t}, DType::kF32);
  MOE_DISPATCH(scale_, dev, t, alpha);
}

double sum_squares(const Tensor& t) {
  const Device dev = check_same_device("sum_squares", {{"t", t}});
  check_dtype("sum_squares", {"t", t}, DType::kF32);
  return MOE_DISPATCH_VALUE(sum_squares, dev, t);
}

void gemm(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, const Tensor& c, bool accumulate,
          float alpha) {
  const Device dev = check_same_device("gemm", {{"a", a}, {"b", b}, {"c", c}});
  check_dtype("gemm", {"a", a}, DType::kF32);
  check_dtype("gemm", {"b", b}, DType::kF32);
  check_dtype("gemm", {"c", c}, DType::kF32);
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
  MOE_DISPATCH(gemm, dev, a, trans_a, b, trans_b, c, accumulate, alpha);
}

}  // namespace moeforge::ops
