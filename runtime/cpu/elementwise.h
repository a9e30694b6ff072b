// CPU kernels of the elementwise ops and GEMM (see runtime/ops.h for the contracts; arguments
// arrive validated).
#pragma once

#include "runtime/tensor.h"

namespace moeforge::cpu {

void fill(const Tensor& t, float value);
void copy(const Tensor& src, const Tensor& dst);
void cast(const Tensor& src, const Tensor& dst);
void add(const Tensor& a, const Tensor& b, const Tensor& out);
void add_(const Tensor& dst, const Tensor& src, float alpha);
void scale_(const Tensor& t, float alpha);
double sum_squares(const Tensor& t);
void gemm(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, const Tensor& c, bool accumulate,
          float alpha);

}  // namespace moeforge::cpu
