// Argument checks shared by the op catalog (runtime/ops_*.cpp). Every failure names the op, the
// argument, what was expected and what was found, including both shapes on a shape mismatch:
//   "rmsnorm_fwd: w has shape (7) but x has shape (4, 8); expected w of shape (8)"
#pragma once

#include <initializer_list>
#include <string_view>

#include "runtime/tensor.h"

namespace moeforge::ops::detail {

struct NamedTensor {
  std::string_view name;
  const Tensor& t;
};

// t is defined and has dtype `dtype`.
void check_dtype(std::string_view op, NamedTensor t, DType dtype);
// t is defined and is f32 or bf16, the compute dtypes (runtime/ops.h, "Dtypes").
void check_float(std::string_view op, NamedTensor t);
// t is defined and has ref's dtype.
void check_same_dtype(std::string_view op, NamedTensor t, NamedTensor ref);
// All tensors are defined and live on the same device; returns that device.
Device check_same_device(std::string_view op, std::initializer_list<NamedTensor> ts);
// t has exactly `expected`; `ref` is the argument whose shape determined the expectation.
void check_shape(std::string_view op, NamedTensor t, const Shape& expected, NamedTensor ref);
// t has `ndim` dims.
void check_ndim(std::string_view op, NamedTensor t, int ndim);
// t has the same shape as ref.
void check_same_shape(std::string_view op, NamedTensor t, NamedTensor ref);

// Rows and columns when t is viewed as a matrix (leading dims flattened).
inline int64_t matrix_cols(const Tensor& t) { return t.ndim() ? t.dim(-1) : 1; }
inline int64_t matrix_rows(const Tensor& t) {
  int64_t r = 1;
  for (int i = 0; i + 1 < t.ndim(); ++i) r *= t.dim(i);
  return r;
}

[[noreturn]] void no_backend(std::string_view op, Device device);

// Mixed precision by widening (runtime/ops.h, "Dtypes"): the CPU kernels compute in f32 only, so
// they run on f32 copies of bf16 operands, made with ops::cast, and their bf16 outputs are
// rounded once, at finish(). An f32 operand — and any CUDA tensor, whose kernels take bf16
// natively — is used as it is (no copy), so the f32 path of an op is exactly what it was.
// Inputs are widened at construction; outputs that the kernel accumulates into (kInOut) too.
class Widened {
 public:
  enum Use { kIn, kOut, kInOut };
  Widened(const Tensor& t, Use use);
  const Tensor& f32() const { return wide_; }
  // Rounds a bf16 output back into its tensor (nothing for inputs or f32 tensors).
  void finish() const;

 private:
  Tensor orig_, wide_;
  Use use_;
};

// The argument checks of ops::router_fwd (runtime/ops_moe.cpp), for ops that take the same
// arguments and more (ops::router_fwd_with_stats); returns the tensors' device.
Device check_router_fwd(std::string_view op, const Tensor& logits, int k, const Tensor& bias, const Tensor& weights,
                        const Tensor& experts, const Tensor& probs);
// The same for ops::router_bwd's arguments (ops::router_bwd_fused takes them and more).
Device check_router_bwd(std::string_view op, const Tensor& logits, const Tensor& experts, const Tensor& dweights,
                        const Tensor& dprobs, const Tensor& dlogits);

}  // namespace moeforge::ops::detail

// Runs the CPU kernel cpu::OP for CPU tensors, and the CUDA kernel cuda::OP
// (runtime/cuda/kernels.h) for CUDA tensors when the CUDA backend is built; otherwise a device
// tensor gets a clear error.
#ifdef MOEFORGE_WITH_CUDA
#include "runtime/cuda/kernels.h"
#define MOE_DISPATCH(OP, DEVICE, ...)                                  \
  do {                                                                 \
    if ((DEVICE).is_cpu()) {                                           \
      ::moeforge::cpu::OP(__VA_ARGS__);                                \
    } else if ((DEVICE).is_cuda()) {                                   \
      ::moeforge::cuda::OP(__VA_ARGS__);                               \
    } else {                                                           \
      ::moeforge::ops::detail::no_backend(#OP, (DEVICE));              \
    }                                                                  \
  } while (0)
// The same for an op that returns a value (sum_squares): an expression.
#define MOE_DISPATCH_VALUE(OP, DEVICE, ...)                                               \
  ((DEVICE).is_cpu()    ? ::moeforge::cpu::OP(__VA_ARGS__)                                \
   : (DEVICE).is_cuda() ? ::moeforge::cuda::OP(__VA_ARGS__)                               \
                        : (::moeforge::ops::detail::no_backend(#OP, (DEVICE)), decltype(::moeforge::cpu::OP(__VA_ARGS__)){}))
#else
#define MOE_DISPATCH(OP, DEVICE, ...)                                  \
  do {                                                                 \
    if ((DEVICE).is_cpu()) {                                           \
      ::moeforge::cpu::OP(__VA_ARGS__);                                \
    } else {                                                           \
      ::moeforge::ops::detail::no_backend(#OP, (DEVICE));              \
    }                                                                  \
  } while (0)
#define MOE_DISPATCH_VALUE(OP, DEVICE, ...)                                               \
  ((DEVICE).is_cpu() ? ::moeforge::cpu::OP(__VA_ARGS__)                                   \
                     : (::moeforge::ops::detail::no_backend(#OP, (DEVICE)), decltype(::moeforge::cpu::OP(__VA_ARGS__)){}))
#endif
